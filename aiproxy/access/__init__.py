"""
Access control: the access keys the proxy holds for its clients, and the per-key
limits (requests and tokens per minute, tokens per day, concurrent requests).
"""
