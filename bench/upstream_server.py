"""A fast local upstream API for the proxy benchmark (asyncio, HTTP/1.1 keep-alive).

Any path answers a small JSON body; /big?size=N streams N bytes in 64 KiB chunks.
"""

from __future__ import annotations

import asyncio

SMALL = b'{"ok": true, "items": [1, 2, 3]}'
CHUNK = b"x" * 65536


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            target = lines[0].split(" ")[1]
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            if length:
                await reader.readexactly(length)
            if target.startswith("/big"):
                size = int(target.split("size=")[1].split("&")[0])
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: " + str(size).encode() + b"\r\n\r\n"
                )
                sent = 0
                while sent < size:
                    part = CHUNK[: min(len(CHUNK), size - sent)]
                    writer.write(part)
                    sent += len(part)
                    await writer.drain()
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(SMALL)).encode()
                    + b"\r\n\r\n"
                    + SMALL
                )
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=2048)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
