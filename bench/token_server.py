"""A fast local token endpoint for benchmarks (asyncio, HTTP/1.1 keep-alive).

Answers every POST with a new access token and a rotated refresh token, counts calls and
reused refresh tokens; GET answers {"calls": N, "reused_refresh_tokens": M}.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from urllib.parse import parse_qs

from loopback import head, serve

counter = itertools.count(1)
stats = {"calls": 0, "reused_refresh_tokens": 0}
seen: set[str] = set()


async def respond(writer: asyncio.StreamWriter, method: str, target: str, body: bytes) -> None:
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
    writer.write(head("application/json", len(data)) + data)
    await writer.drain()


if __name__ == "__main__":
    serve(respond)
