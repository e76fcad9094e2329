"""The headers a call sends upstream (transport.request_headers, both serving paths): the
caller's, filtered; the datasource's defaults where the caller sent none; the token's last, so
nobody overrides them. A table of callers, defaults and token placements."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from datasources.calls import transport
from datasources.proxy.incoming import Headers

BEARER = {"Authorization": "Bearer t"}
CUSTOM = {"X-Api-Token": "t"}

ROWS = [
    # (caller's headers, default headers, token headers, content length) -> sent
    ([("accept", "a/b")], {}, BEARER, 0, {"Accept": "a/b", "Authorization": "Bearer t"}),
    ([("authorization", "Basic caller")], {}, BEARER, 0, {"Authorization": "Bearer t"}),
    ([("authorization", "Basic caller")], {}, {}, 0, {}),
    ([("x-api-token", "caller's")], {}, CUSTOM, 0, {"X-Api-Token": "t"}),
    ([("X-API-TOKEN", "caller's")], {}, CUSTOM, 0, {"X-Api-Token": "t"}),
    ([], {"Authorization": "Basic default"}, BEARER, 0, {"Authorization": "Bearer t"}),
    ([], {"authorization": "Basic default"}, BEARER, 0, {"Authorization": "Bearer t"}),
    ([], {"x-api-token": "default"}, CUSTOM, 0, {"X-Api-Token": "t"}),
    ([("accept", "a/b")], {"Accept": "c/d", "X-V": "2"}, {}, 0, {"Accept": "a/b", "X-V": "2"}),
    ([("content-length", "9")], {}, BEARER, 3, {"Content-Length": "3", **BEARER}),
    (
        [("connection", "X-Hop, keep-alive"), ("x-hop", "h"), ("x-kept", "k")],
        {},
        BEARER,
        0,
        {"X-Kept": "k", **BEARER},
    ),
    ([("connection", "X-Api-Token"), ("x-api-token", "c")], {}, CUSTOM, 0, {"X-Api-Token": "t"}),
]


@pytest.mark.parametrize("caller, defaults, token, length, sent", ROWS)
def test_request_headers(caller, defaults, token, length, sent):
    datasource = SimpleNamespace(default_headers=defaults)
    incoming = Headers([(name.encode(), value.encode()) for name, value in caller])
    assert transport.request_headers(datasource, incoming, token, length) == sent
