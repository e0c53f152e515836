"""aiproxy's pooled HTTP/1.1 client for the one upstream (llhttp, through httptools)."""
