"""The one rule for what an upstream answer says about the token (datasources.calls.challenge)."""

from __future__ import annotations

import pytest

from datasources.calls.challenge import Verdict, challenges, read_answer

E, S, Q = Verdict.EXPIRED, Verdict.STANDS, Verdict.INSUFFICIENT_SCOPE
DEFAULT = frozenset({401})

ROWS = [
    # (status, WWW-Authenticate, expiry statuses, body matched, verdict, scope)
    (401, None, DEFAULT, False, E, ""),  # the bare status, as before
    (403, None, DEFAULT, False, S, ""),
    (200, None, DEFAULT, False, S, ""),
    (200, None, DEFAULT, True, E, ""),  # Slack: HTTP 200 ok:false token_expired (body rule)
    (403, None, frozenset({401, 403}), False, E, ""),  # the datasource's own statuses
    # The header wins over the status.
    (401, 'Bearer error="invalid_token"', DEFAULT, False, E, ""),
    (400, 'Bearer error="invalid_token", error_description="expired"', DEFAULT, False, E, ""),
    (
        401,
        'Bearer realm="api", error="insufficient_scope", scope="repo"',
        DEFAULT,
        False,
        Q,
        "repo",
    ),
    (
        403,
        'Bearer error="insufficient_scope", scope="read:org user"',
        DEFAULT,
        False,
        Q,
        "read:org user",
    ),
    (403, 'Bearer error="insufficient_scope"', frozenset({401, 403}), False, Q, ""),
    (401, 'Bearer error="invalid_request"', DEFAULT, False, S, ""),  # about the request
    (200, 'Bearer error="insufficient_scope"', DEFAULT, True, Q, ""),  # scope beats the body
    # A challenge without an error (no usable credentials, RFC 6750 §3): the status decides.
    (401, 'Bearer realm="example"', DEFAULT, False, E, ""),
    (403, 'Bearer realm="example"', DEFAULT, False, S, ""),
    # DPoP challenges (RFC 9449 §7.1) speak about the token too; other schemes do not.
    (401, 'DPoP algs="ES256", error="invalid_token"', DEFAULT, False, E, ""),
    (401, 'Basic realm="x", error="insufficient_scope"', DEFAULT, False, E, ""),
    (403, 'Basic realm="x", error="invalid_token"', DEFAULT, False, S, ""),
    # Case and several challenges in one header.
    (401, 'Basic realm="x", BEARER Error="Invalid_Token"', DEFAULT, False, E, ""),
    (
        403,
        'Negotiate abc==, Bearer error="insufficient_scope", scope="a b"',
        DEFAULT,
        False,
        Q,
        "a b",
    ),
    # A quoted comma or escaped quote cannot smuggle an error in.
    (403, 'Basic realm="a, Bearer error=\\"invalid_token\\""', DEFAULT, False, S, ""),
    (403, 'Bearer realm="a, error=invalid_token"', DEFAULT, False, S, ""),
    # Garbage is no verdict on the token.
    (403, ",,, =, Bearer", DEFAULT, False, S, ""),
    (401, "", DEFAULT, False, E, ""),
]


@pytest.mark.parametrize(("status", "header", "statuses", "body", "verdict", "scope"), ROWS)
def test_read_answer(status, header, statuses, body, verdict, scope):
    reading = read_answer(status, header, statuses, body)
    assert reading.verdict is verdict
    assert reading.scope == scope


def test_challenges_are_parsed_as_a_list_with_quoted_strings():
    got = challenges(
        'Basic realm="simple", Bearer realm="api, v2", error="invalid_token", '
        'error_description="say \\"hi\\""'
    )
    assert got == [
        ("basic", {"realm": "simple"}),
        ("bearer", {"realm": "api, v2", "error": "invalid_token", "error_description": 'say "hi"'}),
    ]


def test_a_huge_header_is_read_only_up_to_its_cap():
    header = 'Bearer realm="' + "x" * 100_000 + '", error="invalid_token"'
    assert read_answer(403, header, DEFAULT).verdict is Verdict.STANDS
