"""Which request paths go through: pure functions of a path and the forwarded prefixes, no I/O.

The legacy server is IIS on Windows: it percent-decodes the path once and then applies Win32 path
rules, which drop the trailing dots and spaces of every segment (so ``.. `` and ``...`` are ``..``),
and take a backslash for a separator. A path passes only when nothing in it can climb out of the
Exchange virtual directory it names after that decoding and trimming; everything else is refused
before a byte goes upstream.
"""

from __future__ import annotations

from urllib.parse import unquote

Verdict = tuple[int, str, bool]  # (status, message for the client, close the connection)

NOT_A_PATH: Verdict = (400, "The request target must be a path (absolute-form and authority-form are not accepted).", False)
UNCLEAN: Verdict = (400, "The request path contains dot-segments, backslashes or double encoding, which the bridge does not forward.", False)
NOT_FORWARDED: Verdict = (404, "Not found: the bridge forwards only Exchange virtual directories.", False)

# What Windows trims from the end of a path segment (dots and spaces), with the other whitespace a
# decoded segment may carry: a segment of nothing else is a dot-segment to IIS, or worse.
TRIMMED = ". \t\r\n\x0b\x0c"


def is_clean_path(path: str) -> bool:
    """No backslash, no NUL, and no segment made only of dots and whitespace (``.``, ``..``, ``...``,
    ``.. ``, ``..<TAB>``: Windows trims them to dot-segments). ``path`` is already percent-decoded."""
    if "\\" in path or "\x00" in path:
        return False
    return not any(segment and not segment.rstrip(TRIMMED) for segment in path.split("/"))


def is_forwarded(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``path`` is one of the lower-case ``prefixes`` or below one (case-insensitive)."""
    lowered = path.lower()
    return any(lowered == prefix or lowered.startswith(prefix + "/") for prefix in prefixes)


def path_verdict(path: str, prefixes: tuple[str, ...]) -> Verdict | None:
    """(status, message, close) for a request path (the target less its query) that must not reach
    the legacy server, else None."""
    if not path.startswith("/"):
        return NOT_A_PATH
    decoded = unquote(path)
    if "%" in decoded or not is_clean_path(decoded):
        return UNCLEAN
    if not is_forwarded(decoded, prefixes):
        return NOT_FORWARDED
    return None


def log_path(target: str) -> str:
    """The path for logs; the query only for the RPC proxy, where it names the target server:port."""
    path, _, query = target.partition("?")
    if query and path.lower().endswith("/rpcproxy.dll"):
        return f"{path}?{query[:100]}"
    return path[:300]
