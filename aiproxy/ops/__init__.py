"""What operators see: log lines, Prometheus metrics, the API docs."""
