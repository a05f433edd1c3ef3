"""Router processes sharing one port (`--workers N`) act as one router on their control plane.

Requests never cross processes; what must be the same everywhere does: a worker added or removed through
the admin API on one process is added or removed on every process before the admin call returns, and
`/metrics` on any process reports the sums over all of them (SO_REUSEPORT sends each connection to any one
process, so per-process answers would be a random sample).

Each process listens on a Unix socket in a directory the parent made before forking
(`GroupSpec.socket_path`). A sibling connects, sends one JSON object on one line and reads one JSON
object back. A sibling that does not answer within `SIBLING_TIMEOUT_S` is skipped and logged; the
callers report how many answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from router.config import GroupSpec

log = logging.getLogger("router.group")

SIBLING_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a metrics snapshot with thousands of workers stays far below

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ProcessGroup:
    """This process's end of the control plane: serves siblings' questions through `handler` and asks
    siblings its own (`ask_siblings`)."""

    def __init__(self, spec: GroupSpec, handler: Handler) -> None:
        if not 0 <= spec.index < spec.size:
            raise ValueError(f"group index {spec.index} outside 0..{spec.size - 1}")
        self.spec = spec
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None

    @property
    def siblings(self) -> list[int]:
        return [i for i in range(self.spec.size) if i != self.spec.index]

    async def start(self) -> None:
        path = self.spec.socket_path(self.spec.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a process of the same index that died
        self._server = await asyncio.start_unix_server(self._serve, path=path, limit=MAX_MESSAGE_BYTES)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.socket_path(self.spec.index))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), SIBLING_TIMEOUT_S)
            message = orjson.loads(line)
            if not isinstance(message, dict):
                raise ValueError("a control message is a JSON object")
            reply = await self._handler(message)
        except Exception as exc:  # a bad message must not take the process down: answer with the error
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            writer.write(orjson.dumps(reply) + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def ask(self, index: int, message: dict[str, Any]) -> dict[str, Any]:
        """One sibling's answer to `message`; raises OSError/TimeoutError/ValueError when it has none."""

        async def exchange() -> dict[str, Any]:
            reader, writer = await asyncio.open_unix_connection(self.spec.socket_path(index), limit=MAX_MESSAGE_BYTES)
            try:
                writer.write(orjson.dumps(message) + b"\n")
                await writer.drain()
                reply = orjson.loads(await reader.readline())
            finally:
                writer.close()
            if not isinstance(reply, dict):
                raise ValueError(f"sibling {index} answered {reply!r}")
            return reply

        return await asyncio.wait_for(exchange(), SIBLING_TIMEOUT_S)

    async def ask_siblings(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Every sibling's answer, in parallel; siblings that fail or answer an error are logged and left out."""
        replies = await asyncio.gather(*(self.ask(i, message) for i in self.siblings), return_exceptions=True)
        answered = []
        for index, reply in zip(self.siblings, replies, strict=True):
            if isinstance(reply, BaseException):
                log.warning("router process %d did not answer %r: %s", index, message.get("op"), reply)
            elif "error" in reply:
                log.warning("router process %d refused %r: %s", index, message.get("op"), reply["error"])
            else:
                answered.append(reply)
        return answered
