"""HTTP/1.1 head parsing shared by the router's server side (`http_server`) and client side (`upstream`)."""

from __future__ import annotations


def header_value(low_head: bytes, name: bytes) -> bytes | None:
    """Value of header `name` (b"\\r\\nname:", lower case) in a lower-cased message head, or None."""
    i = low_head.find(name)
    if i < 0:
        return None
    start = i + len(name)
    end = low_head.find(b"\r\n", start)
    return low_head[start : end if end >= 0 else None].strip()
