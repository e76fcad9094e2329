"""JSON-body conditions for "the token expired" as tables: their validation (what the admin form
and import refuse, in which words), the evaluator over a body as sent (bounded, never raising),
the decision whether to read a body at all, and their place in the one rule (read_answer)."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from datasources.calls.challenge import Verdict, body_says_expired, inspectable, read_answer
from datasources.models import bodyrules

SLACK = [{"path": "error", "values": ["invalid_auth", "token_expired", "token_revoked"]}]
SALESFORCE = [{"path": "*.errorCode", "values": ["INVALID_SESSION_ID"]}]
MICROSOFT = [{"path": "error.code", "values": ["InvalidAuthenticationToken"]}]


# --- validation --------------------------------------------------------------------------------

VALID = [
    None,
    "",
    [],
    SLACK,
    SALESFORCE,
    MICROSOFT,
    [{"path": "errors.0.code", "values": [401, 401.5, True, "x" * 200]}],
    [{"path": "a", "values": ["v"]}] * 10,
    [{"path": "a." * 99 + "b", "values": list(range(20))}],
]


@pytest.mark.parametrize("rules", VALID)
def test_valid_conditions(rules):
    assert bodyrules.problem(rules) is None


INVALID = [
    ({"path": "error", "values": ["x"]}, "Enter a JSON list of conditions"),
    ("error", "Enter a JSON list of conditions"),
    ([{"path": "a", "values": ["v"]}] * 11, "At most 10 conditions (found 11)."),
    (["error"], 'Condition 1 must be an object with "path" and "values"'),
    ([{"path": "error"}], 'Condition 1 lacks "values"'),
    ([{"values": ["x"]}], 'Condition 1 lacks "path"'),
    (
        [SLACK[0], {"path": "e", "values": ["x"], "case": "i"}],
        'Condition 2 has unknown key(s) "case"',
    ),
    ([{"path": "", "values": ["x"]}], 'Condition 1: "path" must be a non-empty dotted path'),
    ([{"path": "error..code", "values": ["x"]}], 'Condition 1: "path" must be'),
    ([{"path": ".error", "values": ["x"]}], 'Condition 1: "path" must be'),
    ([{"path": "a" * 201, "values": ["x"]}], 'Condition 1: "path" must be'),
    ([{"path": 5, "values": ["x"]}], 'Condition 1: "path" must be'),
    (
        [SLACK[0], {"path": "error", "values": []}],
        'Condition 2: "values" must be a non-empty list of strings, numbers or true/false',
    ),
    ([{"path": "e", "values": "invalid_auth"}], 'Condition 1: "values" must be'),
    ([{"path": "e", "values": [None]}], 'Condition 1: "values" must be'),
    ([{"path": "e", "values": [["x"]]}], 'Condition 1: "values" must be'),
    ([{"path": "e", "values": [{"a": 1}]}], 'Condition 1: "values" must be'),
    ([{"path": "e", "values": ["x" * 201]}], 'Condition 1: "values" must be'),
    ([{"path": "e", "values": list(range(21))}], 'Condition 1: "values" must be'),
    ([{"path": "e", "values": [float("nan")]}], 'Condition 1: "values" must be'),
]


@pytest.mark.parametrize(("rules", "message"), INVALID)
def test_invalid_conditions_are_named_with_what_is_wrong(rules, message):
    found = bodyrules.problem(rules)
    assert found is not None and found.startswith(message), found


# --- the evaluator -----------------------------------------------------------------------------

EVALUATED = [
    # (rules, document, met)
    (SLACK, {"ok": False, "error": "invalid_auth"}, True),
    (SLACK, {"ok": False, "error": "token_revoked"}, True),
    (SLACK, {"ok": False, "error": "channel_not_found"}, False),
    (SLACK, {"ok": True}, False),
    (SLACK, {"ok": False, "error": "INVALID_AUTH"}, False),  # case-sensitive
    (SLACK, {"error": {"error": "invalid_auth"}}, False),  # the value must be a scalar there
    (SLACK, ["invalid_auth"], False),
    (SALESFORCE, [{"message": "Session expired", "errorCode": "INVALID_SESSION_ID"}], True),
    (SALESFORCE, [{"errorCode": "OTHER"}, {"errorCode": "INVALID_SESSION_ID"}], True),
    (SALESFORCE, [{"errorCode": "REQUEST_LIMIT_EXCEEDED"}], False),
    (SALESFORCE, {"errorCode": "INVALID_SESSION_ID"}, False),  # * is for lists
    (MICROSOFT, {"error": {"code": "InvalidAuthenticationToken", "message": "x"}}, True),
    (MICROSOFT, {"error": {"code": "Authorization_RequestDenied"}}, False),
    (MICROSOFT, {"error": "InvalidAuthenticationToken"}, False),
    ([{"path": "errors.1.code", "values": [401]}], {"errors": [{"code": 1}, {"code": 401}]}, True),
    ([{"path": "errors.1.code", "values": [401]}], {"errors": [{"code": 401}]}, False),
    ([{"path": "errors.0", "values": ["x"]}], {"errors": {"0": "x"}}, True),  # a key "0"
    ([{"path": "status", "values": [401]}], {"status": 401.0}, True),
    ([{"path": "status", "values": [401]}], {"status": "401"}, False),
    ([{"path": "ok", "values": [False]}], {"ok": False}, True),
    ([{"path": "ok", "values": [False]}], {"ok": 0}, False),  # false is not 0
    ([{"path": "n", "values": [1]}], {"n": True}, False),  # 1 is not true
    ([{"path": "a.*.*.b", "values": ["x"]}], {"a": [[{"b": "y"}], [{"b": "x"}]]}, True),
    # Malformed conditions stored anyway are never met (the request path never raises).
    ([{"path": 5, "values": ["x"]}, "junk", None], {"5": "x"}, False),
    ("error", {"error": "x"}, False),
    ([{"path": "error", "values": "invalid_auth"}], {"error": "invalid_auth"}, False),
    ([], {"error": "invalid_auth"}, False),
]


@pytest.mark.parametrize(("rules", "document", "met"), EVALUATED)
def test_matches(rules, document, met):
    assert bodyrules.matches(rules, document) is met


def _deflate(data: bytes, raw: bool = False) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


SLACK_DEAD = json.dumps({"ok": False, "error": "invalid_auth"}).encode()
BODIES = [
    # (body as sent, Content-Encoding, met)
    (SLACK_DEAD, None, True),
    (SLACK_DEAD, "identity", True),
    (gzip.compress(SLACK_DEAD), "gzip", True),
    (gzip.compress(SLACK_DEAD), "GZIP", True),
    (_deflate(SLACK_DEAD), "deflate", True),
    (_deflate(SLACK_DEAD, raw=True), "deflate", True),
    (gzip.compress(SLACK_DEAD), None, False),  # compressed but not said to be: not JSON
    (SLACK_DEAD, "gzip", False),  # said to be compressed but is not
    (gzip.compress(SLACK_DEAD)[:-12], "gzip", False),  # truncated
    (SLACK_DEAD, "br", False),  # not decoded here
    (b'{"ok": false, "error": "invalid_auth"', None, False),  # malformed JSON
    (b"\xff\xfe{}", None, False),
    (b"", None, False),
    (None, None, False),
    (b"[" * 100_000 + b"]" * 100_000, None, False),  # above the cap
    (b"[" * 30_000 + b"]" * 30_000, None, False),  # too deep to parse
    # A small compressed body that would decode beyond the cap (a zip bomb) is not inspected.
    (gzip.compress(b'{"error": "invalid_auth", "pad": "' + b" " * 200_000 + b'"}'), "gzip", False),
    (b'{"ok": false, "error": "invalid_auth", "pad": "' + b" " * 66_000 + b'"}', None, False),
]


@pytest.mark.parametrize(("body", "encoding", "met"), BODIES)
def test_body_says_expired(body, encoding, met):
    assert body_says_expired(SLACK, body, encoding, max_bytes=65536) is met


def test_body_says_expired_without_conditions_reads_nothing():
    assert body_says_expired([], SLACK_DEAD) is False


# --- whether to read the body at all ---------------------------------------------------------

CAP = 65536
INSPECTABLE = [
    # (Content-Type, Content-Length, Content-Encoding, read it)
    ("application/json", "40", None, True),
    ("application/json; charset=utf-8", "40", None, True),
    ("Application/JSON", None, None, True),  # chunked: read up to the cap + 1
    ("application/problem+json", "40", None, True),
    ("application/vnd.api+json", "40", "gzip", True),
    ("application/json", str(CAP), None, True),
    ("application/json", str(CAP + 1), None, False),  # declared above the cap
    ("application/json", "40", "br", False),
    ("application/json", "forty", None, False),
    ("text/plain", "40", None, False),
    ("text/html", None, None, False),
    ("application/octet-stream", "40", None, False),
    ("application/jsonp", "40", None, False),
    ("text/json+html", "40", None, False),
    (None, "40", None, False),
]


@pytest.mark.parametrize(("content_type", "length", "encoding", "read"), INSPECTABLE)
def test_inspectable(content_type, length, encoding, read):
    assert inspectable(content_type, length, encoding, CAP) is read


# --- the one rule: a body condition next to the header and the statuses -----------------------


@pytest.mark.parametrize(
    ("status", "header", "body", "verdict"),
    [
        (200, None, True, Verdict.EXPIRED),  # Slack: HTTP 200 ok:false invalid_auth
        (200, None, False, Verdict.STANDS),  # the same answer without a condition met
        (401, None, True, Verdict.EXPIRED),  # Salesforce, Graph: status and body agree
        (403, 'Bearer error="insufficient_scope"', True, Verdict.INSUFFICIENT_SCOPE),
        (200, 'Bearer error="invalid_request"', True, Verdict.STANDS),  # the header wins
    ],
)
def test_a_met_condition_is_an_expired_answer_unless_the_header_says_otherwise(
    status, header, body, verdict
):
    assert read_answer(status, header, frozenset({401}), body).verdict is verdict
