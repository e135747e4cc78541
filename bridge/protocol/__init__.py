"""Sans-IO protocol rules: bytes in, events or bytes out; no sockets, no asyncio, stdlib only."""
