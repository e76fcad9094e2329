"""A datasource's JSON-body conditions for "the token expired": their format, in one place.

Some APIs say "token expired or revoked" only in the body: Slack answers HTTP 200
``{"ok": false, "error": "token_expired"}``, Salesforce a 401 whose body is
``[{"errorCode": "INVALID_SESSION_ID", ...}]``. A datasource names such conditions next to its
"expired" statuses, as a JSON list::

    [{"path": "error", "values": ["invalid_auth", "token_expired"]},
     {"path": "*.errorCode", "values": ["INVALID_SESSION_ID"]}]

``path`` is split on ``.``: a segment names an object's key; on a list, a number picks an element
and ``*`` any element. ``values`` are JSON scalars (strings, numbers, true/false) compared by
equality, strings case-sensitively, ``true`` never equal to ``1``. One condition met is enough.

Pure (no Django, no I/O): :func:`problem` is what the model's ``clean()`` runs (so the admin form
and import refuse the same malformed conditions with the same words), :func:`matches` what the
call core asks of a parsed body (:func:`datasources.calls.challenge.body_says_expired`). Both are
bounded: at most :data:`MAX_RULES` conditions of :data:`MAX_VALUES` values, and a malformed
condition stored anyway (a queryset update skips ``clean()``) is never met rather than an error
on the request path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MAX_RULES = 10
MAX_VALUES = 20
MAX_PATH = 200
MAX_STRING = 200
EXAMPLE = '[{"path": "error", "values": ["invalid_auth", "token_expired"]}]'


def _scalar_problem(value: Any) -> bool:
    """True when ``value`` is not a condition value: a string (≤ MAX_STRING), a finite number,
    true or false (null and containers are not)."""
    if isinstance(value, str):
        return len(value) > MAX_STRING
    if isinstance(value, bool | int):
        return False
    if isinstance(value, float):
        return not math.isfinite(value)
    return True


def problem(rules: Any) -> str | None:
    """Why ``rules`` is not a list of body conditions (one sentence naming the condition and
    what is wrong with it), or None. ``None`` and ``""`` are no conditions (the empty form)."""
    if rules in (None, ""):
        return None
    if not isinstance(rules, list):
        return f"Enter a JSON list of conditions, e.g. {EXAMPLE}, or [] for none."
    if len(rules) > MAX_RULES:
        return f"At most {MAX_RULES} conditions (found {len(rules)})."
    for number, rule in enumerate(rules, start=1):
        where = f"Condition {number}"
        if not isinstance(rule, dict):
            return f'{where} must be an object with "path" and "values", e.g. {EXAMPLE[1:-1]}.'
        if set(rule) != {"path", "values"}:
            missing = sorted({"path", "values"} - set(rule))
            extra = sorted(str(key)[:50] for key in set(rule) - {"path", "values"})
            parts = []
            if missing:
                parts.append("lacks " + " and ".join(f'"{key}"' for key in missing))
            if extra:
                parts.append("has unknown key(s) " + ", ".join(f'"{key}"' for key in extra))
            return f'{where} {"; ".join(parts)}: it takes exactly "path" and "values".'
        path = rule["path"]
        if not isinstance(path, str) or not path or len(path) > MAX_PATH or "" in path.split("."):
            return (
                f'{where}: "path" must be a non-empty dotted path such as "error.code" or '
                f'"*.errorCode" (at most {MAX_PATH} characters, no empty parts).'
            )
        values = rule["values"]
        if (
            not isinstance(values, list)
            or not values
            or len(values) > MAX_VALUES
            or any(_scalar_problem(value) for value in values)
        ):
            return (
                f'{where}: "values" must be a non-empty list of strings, numbers or true/false '
                f"(at most {MAX_VALUES}, strings at most {MAX_STRING} characters)."
            )
    return None


def normalized(rules: Any) -> list[dict[str, Any]]:
    """The stored form of valid ``rules``: ``[]`` for none (the form's empty textarea)."""
    return [] if rules in (None, "") else rules


def _same(found: Any, wanted: Any) -> bool:
    """JSON equality: true is not 1, 1 is 1.0, strings compare as they are."""
    if isinstance(found, bool) or isinstance(wanted, bool):
        return found is wanted
    if isinstance(found, str) or isinstance(wanted, str):
        return isinstance(found, str) and isinstance(wanted, str) and found == wanted
    return isinstance(found, int | float) and isinstance(wanted, int | float) and found == wanted


def _step(nodes: Iterable[Any], segment: str) -> list[Any]:
    """The values one path segment leads to from each of ``nodes``."""
    found: list[Any] = []
    for node in nodes:
        if isinstance(node, dict):
            if segment in node:
                found.append(node[segment])
        elif isinstance(node, list):
            if segment == "*":
                found.extend(node)
            elif segment.isdigit() and int(segment) < len(node):
                found.append(node[int(segment)])
    return found


def matches(rules: Any, document: Any) -> bool:
    """Whether the parsed JSON ``document`` meets one of ``rules``. Never raises: a malformed
    condition is skipped. Each segment moves one level down the document, so the work is at
    most the document's size per condition."""
    if not isinstance(rules, list):
        return False
    for rule in rules[:MAX_RULES]:
        if not isinstance(rule, dict):
            continue
        path, wanted = rule.get("path"), rule.get("values")
        if not isinstance(path, str) or not path or not isinstance(wanted, list):
            continue
        nodes = [document]
        for segment in path.split("."):
            nodes = _step(nodes, segment)
            if not nodes:
                break
        for node in nodes:
            if not isinstance(node, dict | list) and any(_same(node, value) for value in wanted):
                return True
    return False
