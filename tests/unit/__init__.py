"""Unit tests: pure functions table by table, adapters over fake transports and clocks."""
