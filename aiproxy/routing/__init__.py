"""
Several upstreams: the ``UPSTREAMS_FILE``, their passive health and the choice of an
upstream and key for each attempt (pure; the exchange acts on them).
"""
