"""Pure tests: no sockets, no subprocesses, no servers; `pytest tests/unit` runs them in seconds."""
