"""Running the proxy: the command line, the services, worker processes, draining."""
