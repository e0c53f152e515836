"""Pure decisions on bytes and values: no I/O, no reactor, tested table by table."""
