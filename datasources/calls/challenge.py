"""What an upstream answer says about the token it was sent with: one pure function.

An API says "this token is dead" in three ways, and the proxy, the Python client and the
admin's Test must all hear the same thing:

* ``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750 §3.1; ``DPoP`` challenges too,
  RFC 9449 §7.1): the token expired or was revoked. The header wins over the status.
* ``error="insufficient_scope"``: the token is fine but lacks a scope (typically a 403). A
  refresh cannot help (it keeps the same scopes), so the answer is never a reason to refresh,
  even when its status is one of the datasource's "expired" statuses; the missing scope, when
  the challenge names it, is reported so the admin can say which one.
* No such header, or a challenge without an ``error`` (RFC 6750: the request had no usable
  credentials): the datasource's "expired" statuses decide (401 by default), or one of its
  JSON-body conditions (Slack's HTTP 200 ``{"ok": false, "error": "token_expired"}``).

The body is read only when the datasource names conditions, and only a small JSON answer
(:func:`inspectable`); :func:`body_says_expired` turns those bytes into the ``body_says_expired``
fact :func:`read_answer` weighs (the header still wins: ``insufficient_scope`` never refreshes).

Why a parser and not a regular expression over the header: challenges are a comma-separated
list whose parameters are themselves comma-separated and may be quoted strings with escapes
(RFC 9110 §11.2), so ``Basic realm="a, error=\\"invalid_token\\"", Bearer`` must not read as
an invalid-token answer.
"""

from __future__ import annotations

import enum
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..models import bodyrules

#: Challenge schemes whose ``error`` parameter speaks about our access token.
TOKEN_SCHEMES = frozenset({"bearer", "dpop"})
#: The longest header looked at (a hostile upstream cannot make us parse megabytes).
MAX_HEADER = 8192


class Verdict(enum.StrEnum):
    EXPIRED = "expired"  # refresh once (if the rules allow) and retry once
    INSUFFICIENT_SCOPE = "insufficient_scope"  # pass the answer on; never refresh
    STANDS = "stands"  # the answer is not about the token: pass it on


@dataclass(frozen=True)
class Reading:
    verdict: Verdict
    #: The scope(s) the challenge says are needed (``insufficient_scope`` only), as sent.
    scope: str = ""


STANDS = Reading(Verdict.STANDS)
EXPIRED = Reading(Verdict.EXPIRED)


def read_answer(
    status: int,
    www_authenticate: str | None,
    expiry_statuses: frozenset[int],
    body_says_expired: bool = False,
) -> Reading:
    """What the answer (``status``, its ``WWW-Authenticate`` header, and whether one of the
    datasource's JSON-body conditions matched its body) says about the token."""
    error, scope = token_challenge(www_authenticate) if www_authenticate else (None, "")
    if error == "insufficient_scope":
        return Reading(Verdict.INSUFFICIENT_SCOPE, scope)
    if error == "invalid_token":
        return EXPIRED
    if error is not None:  # invalid_request and others: about the request, not the token
        return STANDS
    if status in expiry_statuses or body_says_expired:
        return EXPIRED
    return STANDS


#: Content-Encodings a bounded copy of the body is decoded from for inspection (zlib's window
#: bits to try); brotli, zstd and others are left alone (the answer stands).
_DECODABLE: dict[str, tuple[int, ...]] = {
    "": (),
    "identity": (),
    "gzip": (zlib.MAX_WBITS | 16,),
    "x-gzip": (zlib.MAX_WBITS | 16,),
    # zlib-wrapped per RFC 9110; raw deflate in the wild.
    "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS),
}


def is_json(content_type: str | None) -> bool:
    """``application/json`` or a ``+json`` type (``application/problem+json``), any parameters."""
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def inspectable(
    content_type: str | None,
    content_length: str | None,
    content_encoding: str | None,
    max_bytes: int,
) -> bool:
    """Whether to read an answer's body to look for a body condition: a JSON answer, not
    declared larger than ``max_bytes``, not compressed in a way decoded here. An answer without
    a length is read up to ``max_bytes + 1`` bytes and left alone if it has more."""
    if not is_json(content_type) or (content_encoding or "").strip().lower() not in _DECODABLE:
        return False
    if content_length is None:
        return True
    length = content_length.rpartition(",")[2].strip()
    return length.isdigit() and int(length) <= max_bytes


def _decoded(body: bytes, wbits_tried: Sequence[int], max_bytes: int) -> bytes | None:
    """``body`` without its Content-Encoding (none: ``wbits_tried`` empty), at most
    ``max_bytes`` once decoded (None: larger, or not decodable)."""
    if not wbits_tried:
        return body
    for wbits in wbits_tried:
        decoder = zlib.decompressobj(wbits)
        try:
            out = decoder.decompress(body, max_bytes + 1)
        except zlib.error:
            continue
        return None if len(out) > max_bytes or decoder.unconsumed_tail else out
    return None


def body_says_expired(
    rules: Any, body: bytes | None, content_encoding: str | None = None, *, max_bytes: int = 65536
) -> bool:
    """Whether an answer's ``body`` (as sent, ``content_encoding`` applied) meets one of the
    datasource's conditions (:func:`datasources.models.bodyrules.matches`). False for anything
    that is not a small well-formed JSON document (too large once decoded, broken compression,
    malformed or too deeply nested JSON): the answer then stands. Never raises."""
    if not rules or not body or len(body) > max_bytes:
        return False
    wbits_tried = _DECODABLE.get((content_encoding or "").strip().lower())
    if wbits_tried is None:
        return False
    decoded = _decoded(body, wbits_tried, max_bytes)
    if not decoded:
        return False
    try:
        document = json.loads(decoded)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return bodyrules.matches(rules, document)


def token_challenge(header: str) -> tuple[str | None, str]:
    """The ``error`` and ``scope`` parameters of the first Bearer or DPoP challenge in a
    ``WWW-Authenticate`` value that carries an ``error`` (``(None, "")`` when none does)."""
    for scheme, params in challenges(header[:MAX_HEADER]):
        if scheme in TOKEN_SCHEMES and params.get("error"):
            return params["error"].strip().lower(), params.get("scope", "")
    return None, ""


def challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """RFC 9110 §11.6.1 challenges: ``[(scheme in lower case, {param: value})]``. A token68
    challenge (``Negotiate abc==``) has no parameters; malformed parts are skipped."""
    found: list[tuple[str, dict[str, str]]] = []
    for item in _split_list(header):
        name, _, rest = item.strip().partition(" ")
        rest = rest.strip()
        if "=" in name:  # a parameter of the previous challenge (the list is split on commas)
            if found:
                key, _, value = item.strip().partition("=")
                found[-1][1][key.strip().lower()] = _unquote(value.strip())
            continue
        if not name:
            continue
        params: dict[str, str] = {}
        if rest and "=" in rest and not rest.endswith("="):
            key, _, value = rest.partition("=")
            params[key.strip().lower()] = _unquote(value.strip())
        found.append((name.lower(), params))
    return found


def _split_list(header: str) -> list[str]:
    """Split on commas outside quoted strings (backslash escapes honoured)."""
    parts, current, quoted, escaped = [], [], False, False
    for char in header:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and quoted:
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner, out, escaped = value[1:-1], [], False
        for char in inner:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value
