"""Port 80: ACME HTTP-01 answers and redirects to https, on the bridge's own HTTP/1.1 server.

The same front server as port 443 (bridge.net.front, without TLS): request heads are parsed and
checked by the sans-IO core, a head that drags on gets 408 after --header-timeout, oversized or
malformed heads get 414/431/400, and nothing here reads a request body (a request that has one is
answered and its connection closed).
"""

from __future__ import annotations

from bridge.config import public_origin
from bridge.net.front import ClientConnection, RequestHead
from bridge.protocol.http1 import local_answer

ACME_PREFIX = "/.well-known/acme-challenge/"


class Redirector:
    """Answers ACME HTTP-01 challenges from ``challenges`` (token -> key authorization, filled by the
    ACME client) and redirects everything else to https://FQDN[:port] with the same path."""

    def __init__(self, fqdn: str, https_port: int, challenges: dict[str, str]) -> None:
        self.challenges = challenges
        self.fqdn = fqdn
        self.set_https_port(https_port)

    def set_https_port(self, port: int) -> None:
        self.origin = public_origin(self.fqdn, port)

    async def handle(self, request: RequestHead, client: ClientConnection) -> bool:
        keep = request.keep_alive and not request.has_body and not client.server.draining
        client.write(self.answer(request, keep))
        return keep

    def answer(self, request: RequestHead, keep: bool) -> bytes:
        path = request.raw_path
        with_body = request.method != "HEAD"
        if path.startswith(ACME_PREFIX):
            token = path[len(ACME_PREFIX) :].split("?", 1)[0]
            answer = self.challenges.get(token)
            if answer is None:
                return local_answer(404, "No such ACME challenge.", keep_alive=keep, version=request.version, with_body=with_body)
            return local_answer(200, answer, keep_alive=keep, version=request.version, with_body=with_body)
        if not path.startswith("/"):
            path = "/"
        return local_answer(
            301,
            "This service is served over HTTPS.",
            keep_alive=keep,
            version=request.version,
            with_body=with_body,
            extra_headers=[("Location", self.origin + path)],
        )
