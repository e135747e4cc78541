"""Transcripts fed to the mail protocols' sans-IO observers (bridge.protocol.pop3, bridge.protocol.smtp)."""

from __future__ import annotations

import base64
from typing import Any


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


class Run:
    """A transcript fed to one observer, each side's bytes in pieces of the given sizes; what came out, joined."""

    def __init__(self, observer: Any) -> None:
        self.observer = observer
        self.to_server = b""
        self.to_client = b""
        self.events: list[object] = []
        self.closed = False

    def feed(self, side: str, data: bytes, pieces: list[int] | None = None) -> None:
        """``side`` "c" (the client's bytes) or "s" (the server's); ``pieces``: the sizes to cut ``data`` into first."""
        start = 0
        for size in [*(pieces or []), len(data)]:
            chunk, start = data[start : start + size], start + size
            if chunk:
                out = self.observer.client_data(chunk) if side == "c" else self.observer.server_data(chunk)
                self.to_server += out.to_server
                self.to_client += out.to_client
                self.events += out.events
                self.closed |= out.close
            if start >= len(data):
                return
