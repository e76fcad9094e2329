"""A fast local token endpoint for benchmarks (asyncio, HTTP/1.1 keep-alive).

Answers every POST with a new access token and a rotated refresh token, counts calls and
reused refresh tokens; GET answers {"calls": N, "reused_refresh_tokens": M}.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from urllib.parse import parse_qs

counter = itertools.count(1)
stats = {"calls": 0, "reused_refresh_tokens": 0}
seen: set[str] = set()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method = lines[0].split(" ", 1)[0]
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            if method == "POST":
                stats["calls"] += 1
                old = parse_qs(body.decode()).get("refresh_token", [None])[0]
                if old:
                    if old in seen:
                        stats["reused_refresh_tokens"] += 1
                    seen.add(old)
                number = next(counter)
                payload = {
                    "access_token": f"bench-access-{number}",
                    "refresh_token": f"bench-refresh-{number}",
                    "token_type": "Bearer",
                    "expires_in": 3600,
                }
            else:
                payload = stats
            data = json.dumps(payload).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(data)).encode()
                + b"\r\n\r\n"
                + data
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
