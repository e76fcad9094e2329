"""Issue 31: where a connect link may send a person back to (one pure function, a table).

``return_url_allowed(url, allowed)``: an allowed origin allows any path on exactly that origin
(scheme, host and port); an allowed prefix allows paths under it at a ``/`` boundary. Tricks
that make a URL look like an allowed one (userinfo, another port, a backslash, a longer host
or path) never match; nothing is allowed by default.
"""

from __future__ import annotations

import pytest

from datasources.models.values import end_user_problem, parse_return_urls, return_url_allowed

ORIGIN = ["https://app.example.com"]
PREFIX = ["https://app.example.com/settings/"]
PREFIX_NO_SLASH = ["https://app.example.com/app"]

TABLE = [
    # (url, allowed, expected)
    ("https://app.example.com/anything?x=1", ORIGIN, True),
    ("https://app.example.com", ORIGIN, True),
    ("https://app.example.com:443/x", ORIGIN, True),
    ("https://app.example.com:8443/x", ORIGIN, False),
    ("http://app.example.com/x", ORIGIN, False),
    ("https://app.example.com.evil.example/x", ORIGIN, False),
    ("https://evil.example/https://app.example.com", ORIGIN, False),
    ("https://app.example.com@evil.example/x", ORIGIN, False),
    ("https://user@app.example.com/x", ORIGIN, False),
    ("https://app.example.com\\@evil.example/", ORIGIN, False),
    ("https://app.example.com/x\r\nLocation: https://evil.example", ORIGIN, False),
    ("javascript:alert(1)", ORIGIN, False),
    ("//app.example.com/x", ORIGIN, False),
    ("/settings/", ORIGIN, False),
    ("https://APP.example.com/x", ORIGIN, True),  # hosts compare case-insensitively
    ("https://app.example.com/settings/crm", PREFIX, True),
    ("https://app.example.com/settings/", PREFIX, True),
    ("https://app.example.com/settings/?tab=1", PREFIX, True),
    ("https://app.example.com/settingsX", PREFIX, False),
    ("https://app.example.com/other", PREFIX, False),
    ("https://app.example.com/app", PREFIX_NO_SLASH, True),
    ("https://app.example.com/app/x", PREFIX_NO_SLASH, True),
    ("https://app.example.com/apple", PREFIX_NO_SLASH, False),
    ("https://app.example.com/x", [], False),  # nothing by default
]


@pytest.mark.parametrize("url, allowed, expected", TABLE)
def test_return_url_allowed(url, allowed, expected):
    assert return_url_allowed(url, allowed) is expected


def test_allowed_return_urls_are_parsed_one_per_line():
    assert parse_return_urls(" https://a.example \n\nhttps://b.example/x/\n") == [
        "https://a.example",
        "https://b.example/x/",
    ]
    for bad in ("ftp://a.example", "https://a.example/?q=1", "https://a.example/#x", "a.example"):
        with pytest.raises(ValueError):
            parse_return_urls(bad)


@pytest.mark.parametrize(
    "value, ok",
    [
        ("u-1", True),
        ("user@example.com", True),
        ("Ünïcode-id", True),
        ("x" * 255, True),
        ("", False),
        ("x" * 256, False),
        (" u-1", False),
        ("u-1 ", False),
        ("u\n1", False),
        ("u\x001", False),
        (1, False),
    ],
)
def test_end_user_ids(value, ok):
    assert (end_user_problem(value) is None) is ok
