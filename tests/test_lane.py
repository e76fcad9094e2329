"""The fast lane's one rule (may it serve this call?) as a table, and proof that a hot-path call
is served by the lane itself while a session call is handed over before anything went upstream."""

from __future__ import annotations

import pytest

from datasources.proxy.lane import HandOver, hand_over_reason
from datasources.proxy.limits import Verdict

FINE = dict(middleware_known=True, chunked=False, length=10, api_key=True)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({}, None),
        ({"dpop": False, "token_usable": True}, None),
        ({"gate": Verdict.PASS}, None),
        ({"middleware_known": False}, HandOver.MIDDLEWARE),
        ({"middleware_known": False, "api_key": False}, HandOver.MIDDLEWARE),
        ({"chunked": True}, HandOver.CHUNKED),
        ({"length": 1024 * 1024}, None),  # PROXY_REPLAY_MAX_BYTES: still buffered
        ({"length": 1024 * 1024 + 1}, HandOver.LARGE_BODY),
        ({"api_key": False}, HandOver.NOT_API_KEY),
        ({"dpop": True}, HandOver.DPOP),
        ({"token_usable": False}, HandOver.TOKEN),
        ({"gate": Verdict.PROBE}, HandOver.GATE),
        ({"gate": Verdict.RATE_LIMITED}, HandOver.GATE),
        ({"gate": Verdict.CIRCUIT_OPEN}, HandOver.GATE),
        ({"chunked": True, "api_key": False}, HandOver.CHUNKED),
        ({"traced": True}, HandOver.TRACED),
        ({"traced": True, "chunked": True, "api_key": False}, HandOver.TRACED),
        ({"traced": True, "middleware_known": False}, HandOver.MIDDLEWARE),
    ],
)
def test_hand_over_reason(facts, expected):
    assert hand_over_reason(**{**FINE, **facts}) is expected
