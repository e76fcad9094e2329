"""The small HTTP/1.1 keep-alive server under the benchmarks' local peers (asyncio, loopback).

Each peer supplies ``respond(writer, method, target, body)``; this module reads requests off
each connection, hands them over in order, and prints the listening port on the first line of
standard output for the benchmark that started it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

#: Request bodies larger than this are read and discarded rather than kept.
DRAIN_ABOVE = 16 << 20

Respond = Callable[[asyncio.StreamWriter, str, str, bytes], Awaitable[None]]


def head(content_type: str, length: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode("latin-1")


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    method, target = lines[0].split(" ")[:2]
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    if length > DRAIN_ABOVE:  # a large upload: counted and thrown away as it arrives
        while length:
            length -= len(await reader.read(min(length, 1 << 20)))
        return method, target, b""
    body = await reader.readexactly(length) if length else b""
    return method, target, body


def serve(respond: Respond, *, backlog: int = 1024) -> None:
    """Serve on 127.0.0.1 (port from argv[1], default any free one) until killed."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await respond(writer, *await _read_request(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
        server = await asyncio.start_server(connection, "127.0.0.1", port, backlog=backlog)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
