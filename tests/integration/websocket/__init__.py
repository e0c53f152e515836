"""WebSocket tunnels end to end: real clients, aiproxy, a WebSocket upstream on loopback."""
