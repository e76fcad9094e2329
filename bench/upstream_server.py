"""A fast local upstream API for the proxy benchmark (asyncio, HTTP/1.1 keep-alive).

Any path answers a small JSON body; /big?size=N streams N bytes in 64 KiB chunks.
"""

from __future__ import annotations

import asyncio

from loopback import head, serve

SMALL = b'{"ok": true, "items": [1, 2, 3]}'
CHUNK = b"x" * 65536


async def respond(writer: asyncio.StreamWriter, method: str, target: str, body: bytes) -> None:
    if target.startswith("/big"):
        size = int(target.split("size=")[1].split("&")[0])
        writer.write(head("application/octet-stream", size))
        sent = 0
        while sent < size:
            part = CHUNK[: min(len(CHUNK), size - sent)]
            writer.write(part)
            sent += len(part)
            await writer.drain()
    else:
        writer.write(head("application/json", len(SMALL)) + SMALL)
        await writer.drain()


if __name__ == "__main__":
    serve(respond, backlog=2048)
