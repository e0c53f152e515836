"""The exchange: one client request and its upstream attempts, whichever door it came by."""
