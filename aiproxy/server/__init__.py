"""The front doors: aiproxy's HTTP/1.1 server, and the twisted.web resource for embedding."""
