"""The call's steps that know no transport (datasources/calls/call.py): a failure while getting a
token or calling upstream becomes one answer, as plain data, whoever serves the call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import urllib3

from datasources.calls.call import Refused, refusal_for, upstream_refusal
from datasources.exceptions import (
    NotAuthorized,
    ReauthorizationRequired,
    TransientUpstreamError,
)
from datasources.security.dpop import DPoPKeyError
from datasources.security.tls import TLSConfigError


def datasource(*, per_user: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        slug="crm",
        per_user=per_user,
        get_authorize_url=lambda: "/admin/datasources/datasource/1/authorize/",
        get_connect_url=lambda: "/api/v1/datasources/crm/connect",
    )


def absolute(url: str) -> str:
    return "https://app.example" + url


POOL = urllib3.HTTPConnectionPool("upstream.example")


@pytest.mark.parametrize(
    ("err", "per_user", "status", "body", "headers"),
    [
        (
            NotAuthorized("never authorized"),
            False,
            409,
            {
                "error": "not_authorized",
                "detail": "Datasource 'crm' needs to be authorized in the admin.",
                "datasource": "crm",
                "authorize_url": "https://app.example/admin/datasources/datasource/1/authorize/",
            },
            {},
        ),
        (
            ReauthorizationRequired("invalid_grant"),
            True,
            409,
            {
                "error": "reauthorization_required",
                "detail": "Datasource 'crm' needs to be authorized by the calling user.",
                "datasource": "crm",
                "authorize_url": "https://app.example/api/v1/datasources/crm/connect",
            },
            {},
        ),
        (
            TransientUpstreamError("the token endpoint answered 503", retry_after=2.5),
            False,
            503,
            {
                "error": "token_unavailable",
                "detail": "Could not get an access token for 'crm': the token endpoint "
                "answered 503",
            },
            {"Retry-After": "2"},
        ),
        (
            TransientUpstreamError("timed out"),
            False,
            503,
            {
                "error": "token_unavailable",
                "detail": "Could not get an access token for 'crm': timed out",
            },
            {},
        ),
        (
            urllib3.exceptions.NewConnectionError(POOL, "refused"),
            False,
            502,
            {
                "error": "upstream_unreachable",
                "detail": "The upstream API refused the connection.",
            },
            {},
        ),
        (
            urllib3.exceptions.ReadTimeoutError(POOL, "/", "read timed out"),
            False,
            504,
            {"error": "upstream_timeout", "detail": "The upstream API did not answer in time."},
            {},
        ),
        (
            DPoPKeyError("the DPoP key cannot be read"),
            False,
            503,
            {
                "error": "dpop_key_unusable",
                "detail": "No call was made: the DPoP key cannot be read",
            },
            {},
        ),
        (
            TLSConfigError("the CA bundle is not PEM"),
            False,
            502,
            {
                "error": "upstream_tls_failed",
                "detail": "No call was made: the CA bundle is not PEM.",
            },
            {},
        ),
        (
            urllib3.exceptions.ProtocolError("Connection aborted."),
            False,
            502,
            {
                "error": "upstream_unreachable",
                "detail": "The upstream API is unreachable (ProtocolError).",
            },
            {},
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_a_failure_becomes_one_answer(err, per_user, status, body, headers):
    refused = refusal_for(err, datasource(per_user=per_user), absolute)
    assert isinstance(refused, Refused)
    assert (refused.status, refused.body(), refused.headers) == (status, body, headers)


@pytest.mark.parametrize("err", [ValueError("a bug"), KeyError("x"), RuntimeError()])
def test_errors_of_this_server_are_not_answered_as_the_upstreams(err):
    assert refusal_for(err, datasource(), absolute) is None
    assert upstream_refusal(err) is None


def test_without_a_request_the_authorize_url_stays_as_it_is():
    refused = refusal_for(NotAuthorized("x"), datasource())
    assert refused is not None
    assert refused.body()["authorize_url"] == "/admin/datasources/datasource/1/authorize/"


@pytest.mark.parametrize(
    ("err", "sentence"),
    [
        (
            urllib3.exceptions.NewConnectionError(POOL, "refused"),
            "The upstream API refused the connection (the proxy would answer 502).",
        ),
        (
            urllib3.exceptions.ConnectTimeoutError(POOL, "timed out"),
            "The upstream API did not answer in time (the proxy would answer 504).",
        ),
        (
            DPoPKeyError("the DPoP key cannot be read"),
            "No call was made: the DPoP key cannot be read",
        ),
        (
            TLSConfigError("the CA bundle is not PEM"),
            "No call was made: the CA bundle is not PEM (the proxy would answer 502).",
        ),
        (
            urllib3.exceptions.ProtocolError("Connection aborted."),
            "The upstream API is unreachable (ProtocolError; the proxy would answer 502).",
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
)
def test_the_admins_test_words_the_proxys_own_answer(err, sentence):
    """The Test button does not map transport errors itself: it words the proxy's answer."""
    from datasources.admin.probe import _reported

    refused = upstream_refusal(err)
    assert refused is not None
    assert _reported(refused) == sentence
