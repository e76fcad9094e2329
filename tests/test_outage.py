"""Issue 30: token-endpoint outages answer "try again", never "unauthorized".

The API rejects a token while the token endpoint is down (the provider revoked its access
tokens, or the token was rejected a second before its recorded expiry, as in the incident): the
refresh that follows fails transiently, and every entry point says "token unavailable, come
back in N s" (the proxy's 503 ``token_unavailable`` with ``Retry-After`` on both serving paths,
the Python client's TransientUpstreamError, the admin Test's plain sentence), never the
upstream's 401. A token known to be expired that cannot be renewed is never sent upstream.

The providers are the local fakes of ``tests/fakeprovider.py``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from datasources.models import Token, TokenStatus

from . import fakeprovider, test_provider_edges
from .fakeprovider import FakeProvider, connect
from .test_provider_edges import Outcome, Via

pytestmark = pytest.mark.django_db(transaction=True)

fake_provider = fakeprovider.fake_provider  # the fixture: starts and stops fake providers
#: The fixture: the proxy on both serving paths, the Python client and the admin's Test.
via = test_provider_edges.via


def row(datasource) -> Token:
    return Token.objects.get(datasource=datasource, user=None)


def assert_unavailable(outcome: Outcome, via: Via) -> None:
    """The entry point's way of saying "no token right now, come back later"."""
    if via.name.startswith("proxy"):
        assert outcome.status == 503, outcome.body
        assert outcome.body["error"] == "token_unavailable"
        retry_after = outcome.headers.get("Retry-After")
        assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
    elif via.name == "client":
        assert outcome.refused == "TransientUpstreamError", outcome
    else:
        assert outcome.status is None, outcome
        assert "could" in outcome.refused and "try again" in outcome.refused, outcome.refused
        assert "re-authorize" not in outcome.refused.replace("not a reason to re-authorize", "")


@pytest.mark.parametrize("when", ["valid", "a second before expiry"])
def test_rejected_while_the_token_endpoint_is_down_is_503_not_401(
    fake_provider, staff_client, settings, via, when
):
    settings.DATASOURCES = {**settings.DATASOURCES, "PROBE_INTERVAL": 30}
    provider: FakeProvider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    before = row(datasource)
    if when != "valid":
        # The incident: rejected about a second before the recorded expiry.
        Token.objects.filter(pk=before.pk).update(expires_at=timezone.now() + timedelta(seconds=1))
    provider.revoke_access_tokens()
    provider.fail("503-html")

    first = via.call(datasource, "me")
    assert_unavailable(first, via)
    # The rejected token went upstream once (401), the refresh failed once, nothing more.
    assert [call.status for call in provider.api()] == [401]
    assert len(provider.refresh_calls()) == 1

    # The next call within the probe interval: no token request, the same answer.
    second = via.call(datasource, "me")
    assert_unavailable(second, via)
    assert len(provider.refresh_calls()) == 1
    assert all(call.status == 401 for call in provider.api())
    after = row(datasource)
    assert after.status == TokenStatus.ACTIVE  # transient: nothing thrown away
    assert after.failure_kind == "transient"
    assert after.refresh_token == before.refresh_token


def test_rejected_then_the_token_endpoint_recovers(fake_provider, staff_client, settings, via):
    """Once the token endpoint is back, the next probe renews the token and the call succeeds."""
    provider: FakeProvider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    provider.revoke_access_tokens()
    provider.fail("503-html")
    assert_unavailable(via.call(datasource, "me"), via)
    provider.recover()
    # The probe interval has passed (time travel on the row, never sleeping).
    Token.objects.filter(datasource=datasource).update(
        last_attempt_at=timezone.now() - timedelta(minutes=1)
    )
    outcome = via.call(datasource, "me")
    assert outcome.status == 200, outcome
    assert provider.api()[-1].status == 200


def test_an_expired_token_that_cannot_be_renewed_is_never_sent(
    fake_provider, staff_client, settings, via
):
    settings.DATASOURCES = {**settings.DATASOURCES, "PROBE_INTERVAL": 30}
    provider: FakeProvider = fake_provider("rfc")
    datasource = connect(provider, staff_client)
    Token.objects.filter(datasource=datasource).update(
        expires_at=timezone.now() - timedelta(seconds=5)
    )
    provider.fail("503-html")
    for _ in range(2):
        outcome = via.call(datasource, "me")
        if via.name.startswith("proxy"):
            assert outcome.status == 503 and outcome.body["error"] == "token_unavailable"
            assert int(outcome.headers["Retry-After"]) >= 1
        elif via.name == "client":
            assert outcome.refused == "TransientUpstreamError", outcome
        else:
            assert outcome.refused.startswith("No access token to call with"), outcome
    assert provider.api() == []  # the expired token never reached the API
    assert len(provider.refresh_calls()) == 1  # one probe; the second call waited for the next
