"""Opt-in retries: the decision as a table, then the proxy, the admin's Test and the Python
client against a real flaky upstream, with every attempt counted at the upstream."""

from __future__ import annotations

import email.utils
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from datasources.admin import probe
from datasources.calls.retries import (
    CONNECTION_ERROR,
    RetryPolicy,
    caller_retries,
    decide_retry,
    parse_retry_after,
)
from datasources.models import Datasource, Token
from datasources.proxy import cache as proxy_cache
from datasources.proxy import usage
from datasources.proxy.apikeys import create_api_key

from .conftest import make_datasource
from .flaky import HANG, RESET, FlakyUpstream, status

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("serving")]

ACCESS_TOKEN = "stored-access-token-" + "s" * 24
POLICY = RetryPolicy(max_retries=3, budget=10.0, backoff_base=0.5, backoff_max=8.0)
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


# --- the decision ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("why", "kwargs", "expected"),
    [
        ("503 on GET: backoff, half of the base at jitter 0", {"status": 503}, 0.25),
        ("jitter 1 is the whole step", {"status": 503, "jitter": 0.999999}, 0.5),
        ("second retry doubles", {"status": 502, "retries_done": 1}, 0.5),
        ("backoff capped", {"status": 504, "retries_done": 2, "jitter": 0.999999}, 2.0),
        ("429 with Retry-After: that wait", {"status": 429, "retry_after": 3.0}, 3.0),
        ("Retry-After 0: at once", {"status": 503, "retry_after": 0.0}, 0.0),
        ("connection error retried", {"status": CONNECTION_ERROR}, 0.25),
        ("count used up", {"status": 503, "retries_done": 3}, None),
        ("401 is never retried here", {"status": 401}, None),
        ("500 not among the statuses", {"status": 500}, None),
        ("200 stands", {"status": 200}, None),
        ("POST without Idempotency-Key", {"status": 503, "method": "POST"}, None),
        ("PATCH without Idempotency-Key", {"status": 503, "method": "PATCH"}, None),
        ("POST with Idempotency-Key", {"status": 503, "method": "POST", "key": True}, 0.25),
        ("streamed body cannot be sent again", {"status": 503, "replayable": False}, None),
        ("Retry-After past the budget", {"status": 429, "retry_after": 11.0}, None),
        ("backoff past the budget", {"status": 503, "elapsed": 9.9}, None),
        ("within the budget", {"status": 503, "elapsed": 9.7}, 0.25),
        ("PUT and DELETE are idempotent", {"status": 503, "method": "DELETE"}, 0.25),
    ],
)
def test_decide_retry(why, kwargs, expected):
    kwargs = dict(kwargs)
    result = decide_retry(
        kwargs.pop("policy", POLICY),
        method=kwargs.pop("method", "GET"),
        status=kwargs.pop("status"),
        retries_done=kwargs.pop("retries_done", 0),
        elapsed=kwargs.pop("elapsed", 0.0),
        retry_after=kwargs.pop("retry_after", None),
        idempotency_key=kwargs.pop("key", False),
        replayable=kwargs.pop("replayable", True),
        jitter=kwargs.pop("jitter", 0.0),
    )
    assert not kwargs
    assert result == (pytest.approx(expected) if expected is not None else None), why


def test_decide_retry_connection_errors_can_be_off_and_no_policy_never_retries():
    off = RetryPolicy(max_retries=3, connection_errors=False)
    assert (
        decide_retry(off, method="GET", status=CONNECTION_ERROR, retries_done=0, elapsed=0) is None
    )
    assert decide_retry(off, method="GET", status=503, retries_done=0, elapsed=0) is not None
    none = RetryPolicy.of(Datasource(retry_count=0))
    assert decide_retry(none, method="GET", status=503, retries_done=0, elapsed=0) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        (email.utils.format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (email.utils.format_datetime(NOW - timedelta(seconds=90), usegmt=True), 0.0),
        ("-5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize(
    ("header", "configured", "expected"),
    [(None, 3, 3), ("0", 3, 0), ("1", 3, 1), ("9", 3, 3), ("-1", 3, 3), ("x", 3, 3)],
)
def test_the_caller_may_ask_for_fewer_retries_never_more(header, configured, expected):
    policy = RetryPolicy.of(Datasource(retry_count=configured), requested=header)
    assert policy.max_retries == expected
    assert caller_retries("1000") is None


def test_only_retryable_statuses_can_be_configured():
    datasource = Datasource(
        name="x",
        slug="x",
        base_url="https://a.example/",
        access_token_url="https://a.example/t",
        client_id="c",
        grant_type="client_credentials",
        retry_statuses="401, 503",
    )
    with pytest.raises(ValidationError) as err:
        datasource.full_clean()
    assert "retry_statuses" in err.value.message_dict
    datasource.retry_statuses = "503 429"
    datasource.full_clean()
    assert datasource.retry_statuses == "429,503"


# --- against a real flaky upstream -------------------------------------------------------------


@pytest.fixture(autouse=True)
def quick_backoff(settings):
    settings.DATASOURCES = {
        **settings.DATASOURCES,
        "RETRY_BACKOFF_BASE": 0.01,
        "RETRY_BACKOFF_MAX": 0.05,
        "PROXY_READ_TIMEOUT": 0.5,
    }
    proxy_cache.forget()
    usage.discard()
    yield
    proxy_cache.forget()


def flaky_datasource(flaky: FlakyUpstream, **fields) -> Datasource:
    fields.setdefault("slug", "flaky")
    fields.setdefault("name", "Flaky API")
    fields.setdefault("base_url", f"{flaky.base}/api/")
    datasource = make_datasource(
        grant_type="client_credentials",
        authorization_url="",
        access_token_url=f"{flaky.base}/token",
        **fields,
    )
    long_ago = timezone.now() - timedelta(hours=1)  # old enough to be blamed for a 401
    Token.objects.filter(datasource=datasource, user=None).update(
        access_token=ACCESS_TOKEN,
        token_type="Bearer",
        status="active",
        expires_at=timezone.now() + timedelta(hours=1),
        obtained_at=long_ago,
        last_refreshed_at=long_ago,
        refresh_due_at=None,
    )
    return datasource


@pytest.fixture
def call(flaky):
    _, key = create_api_key("app")
    client = Client(HTTP_AUTHORIZATION=f"Api-Key {key}")

    def send(method: str, path: str, slug: str = "flaky", **kwargs):
        response = getattr(client, method.lower())(
            f"/api/v1/datasources/{slug}/proxy/{path}", **kwargs
        )
        if response.streaming:
            response.content = b"".join(response.streaming_content)
        return response

    return send


def test_503s_are_retried_until_the_answer_is_good(flaky, call):
    flaky_datasource(flaky, retry_count=3)
    flaky.script("/api/things", status(503), status(502), status(504))
    response = call("GET", "things?q=1")
    assert response.status_code == 200
    assert flaky.count("/api/things") == 4


def test_retries_stop_at_the_count_and_the_last_answer_is_passed_on(flaky, call):
    flaky_datasource(flaky, retry_count=2)
    flaky.script("/api/things", status(503), status(503), status(503, X_Attempt="third"))
    response = call("GET", "things")
    assert response.status_code == 503 and response["X-Attempt"] == "third"
    assert flaky.count("/api/things") == 3


def test_no_retries_unless_the_datasource_opts_in(flaky, call):
    flaky_datasource(flaky)
    flaky.script("/api/things", status(503))
    assert call("GET", "things").status_code == 503
    assert flaky.count("/api/things") == 1


def test_only_the_configured_statuses_are_retried(flaky, call):
    flaky_datasource(flaky, retry_count=3, retry_statuses="503")
    flaky.script("/api/things", status(502))
    assert call("GET", "things").status_code == 502
    assert flaky.count("/api/things") == 1


def test_post_is_retried_only_with_an_idempotency_key(flaky, call):
    flaky_datasource(flaky, retry_count=3)
    flaky.script("/api/orders", status(503))
    response = call("POST", "orders", data=b'{"n": 1}', content_type="application/json")
    assert response.status_code == 503 and flaky.count("/api/orders") == 1

    flaky.script("/api/orders", status(503))
    response = call(
        "POST",
        "orders",
        data=b'{"n": 2}',
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY="order-2",
    )
    assert response.status_code == 200 and flaky.count("/api/orders") == 3
    replayed = flaky.last("/api/orders")
    assert replayed.body == b'{"n": 2}'  # the buffered body, sent again
    assert replayed.headers["Idempotency-Key"] == "order-2"  # forwarded: the upstream needs it


def test_a_streamed_body_is_never_sent_twice(flaky, call, settings):
    settings.DATASOURCES = {**settings.DATASOURCES, "PROXY_REPLAY_MAX_BYTES": 16}
    flaky_datasource(flaky, retry_count=3)
    flaky.script("/api/upload", status(503))
    response = call("PUT", "upload", data=b"x" * 100, content_type="application/octet-stream")
    assert response.status_code == 503 and flaky.count("/api/upload") == 1


def test_the_caller_header_asks_for_fewer_and_is_not_forwarded(flaky, call):
    flaky_datasource(flaky, retry_count=3)
    flaky.script("/api/things", status(503), status(503), status(503))
    assert call("GET", "things", HTTP_X_DATASOURCE_RETRIES="0").status_code == 503
    assert flaky.count("/api/things") == 1
    assert call("GET", "things", HTTP_X_DATASOURCE_RETRIES="1").status_code == 503
    assert flaky.count("/api/things") == 3
    assert "X-Datasource-Retries" not in flaky.last("/api/things").headers
    assert call("GET", "things", HTTP_X_DATASOURCE_RETRIES="7").status_code == 200
    assert flaky.count("/api/things") == 4


def test_retry_after_in_seconds_and_as_a_date_is_waited_for(flaky, call):
    flaky_datasource(flaky, retry_count=2, retry_budget=5)
    flaky.script("/api/limited", status(429, Retry_After="1"))
    started = time.monotonic()
    assert call("GET", "limited").status_code == 200
    assert time.monotonic() - started >= 1.0  # the upstream asked for a second
    assert flaky.count("/api/limited") == 2

    past = email.utils.format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    flaky.script("/api/dated", status(503, Retry_After=past))
    assert call("GET", "dated").status_code == 200
    assert flaky.count("/api/dated") == 2


def test_a_retry_after_beyond_the_budget_passes_the_answer_on_at_once(flaky, call):
    flaky_datasource(flaky, retry_count=3, retry_budget=5)
    flaky.script("/api/limited", status(429, Retry_After="120"))
    response = call("GET", "limited")
    assert response.status_code == 429 and response["Retry-After"] == "120"
    assert flaky.count("/api/limited") == 1


def test_connection_resets_and_timeouts_are_retried(flaky, call):
    flaky_datasource(flaky, retry_count=2)
    flaky.script("/api/reset", RESET, RESET)
    assert call("GET", "reset").status_code == 200
    assert flaky.count("/api/reset") == 3

    flaky.script("/api/slow", HANG)
    assert call("GET", "slow").status_code == 200
    assert flaky.count("/api/slow") == 2


def test_connection_errors_are_not_retried_when_switched_off(flaky, call):
    flaky_datasource(flaky, retry_count=2, retry_on_connection_errors=False)
    flaky.script("/api/reset", RESET)
    assert call("GET", "reset").status_code == 502
    assert flaky.count("/api/reset") == 1


def test_a_401_gets_one_refresh_and_one_retry_whatever_the_retry_count(flaky, call):
    flaky_datasource(flaky, retry_count=5, retry_statuses="429,502,503,504")
    flaky.always["/api/me"] = status(401)
    response = call("GET", "me")
    assert response.status_code == 401
    assert flaky.count("/api/me") == 2  # the call, and one retry with the refreshed token
    assert flaky.token_calls == 1
    assert flaky.last("/api/me").headers["Authorization"].startswith("Bearer fresh-access-token-1")


def test_a_503_then_401_refreshes_once_then_succeeds(flaky, call):
    flaky_datasource(flaky, retry_count=2)
    flaky.script("/api/me", status(503), status(401))
    response = call("GET", "me")
    assert response.status_code == 200
    assert flaky.count("/api/me") == 3 and flaky.token_calls == 1


def test_the_admin_test_button_retries_as_the_proxy_does(flaky):
    datasource = flaky_datasource(flaky, retry_count=2)
    flaky.script("/api/me", status(503), status(429, Retry_After="0"))
    result = probe.run(datasource, "GET", "me")
    assert (result.status, result.retries) == (200, 2)
    assert flaky.count("/api/me") == 3


def test_the_python_client_retries_and_honours_the_header(flaky):
    datasource = flaky_datasource(flaky, retry_count=2)
    flaky.script("/api/me", status(503), RESET)
    with datasource.session() as api:
        assert api.get("me").status_code == 200
        assert flaky.count("/api/me") == 3
        flaky.script("/api/me", status(503))
        response = api.get("me", headers={"x-datasource-retries": "0"})
        assert response.status_code == 503 and flaky.count("/api/me") == 4
        assert "X-Datasource-Retries" not in {k.title() for k in flaky.last("/api/me").headers}
        flaky.script("/api/orders", status(503))
        assert api.post("orders", json={"a": 1}).status_code == 503
        assert flaky.count("/api/orders") == 1
        flaky.script("/api/orders", status(503))
        response = api.post("orders", json={"a": 1}, headers={"Idempotency-Key": "k1"})
        assert response.status_code == 200 and flaky.count("/api/orders") == 3
        assert json.loads(flaky.last("/api/orders").body) == {"a": 1}


@pytest.mark.parametrize(
    "value",
    [
        "1.5",
        "   ",
        "Wed, 21 Oct 2015 07:28:00 +9999",  # an offset datetime refuses
        "Wed, 21 Oct 10000 07:28:00 GMT",  # a year datetime refuses
        "Wed, 21 Oct 2015 25:28:00 GMT",
        "Mon",
    ],
)
def test_parse_retry_after_never_raises_on_what_a_server_sends(value):
    assert parse_retry_after(value, NOW) is None


def test_one_retry_after_parser_for_upstreams_authorization_servers_and_webhooks():
    """The token endpoint's, the upstream API's and a webhook receiver's Retry-After are read by
    the same guarded function (authserver/outbound.py: the lowest layer all of them may import)."""
    from datasources.authserver import oauth, outbound
    from datasources.calls import retries
    from datasources.webhooks import delivery

    assert oauth.parse_retry_after is outbound.parse_retry_after
    assert retries.parse_retry_after is outbound.parse_retry_after
    assert delivery.parse_retry_after is outbound.parse_retry_after
    assert outbound.parse_retry_after("120") == 120.0  # "now" defaults to the current time
