"""End-to-end tests: a fake upstream and aiproxy on real loopback sockets."""
