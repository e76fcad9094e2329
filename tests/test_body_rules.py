"""Expired-token JSON-body conditions end to end (issue #29): on both serving paths (the view
under WSGI, the ASGI fast lane), the Python client and the admin's Test, against the fake Slack
provider and a scripted upstream that answers gzip, chunked, large and non-JSON bodies; plus the
admin form and import refusing malformed conditions, and export carrying them.

Outcomes are counted where they happen: token requests at the token endpoint, bytes as the
caller received them."""

from __future__ import annotations

import gzip
import io
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from datasources import tokens
from datasources.admin import presets, probe
from datasources.models import Datasource, Token
from datasources.ops import config_io
from datasources.proxy.apikeys import create_api_key

from . import fakeprovider
from .conftest import make_datasource
from .fakeprovider import api_key_client, body_json, connect, proxy_url
from .helpers import body_of

pytestmark = pytest.mark.django_db(transaction=True)

fake_provider = fakeprovider.fake_provider

SLACK_RULES = presets.all_presets()["slack"]["expiry_body_rules"]
DEAD = {"ok": False, "error": "invalid_auth"}


def age(datasource: Datasource, seconds: float = 3600) -> None:
    """The token was obtained ``seconds`` ago (a rejection of a brand-new token is not blamed
    on it: the token rules would not refresh)."""
    then = timezone.now() - timedelta(seconds=seconds)
    Token.objects.filter(datasource=datasource).update(
        last_refreshed_at=then, obtained_at=then, rejection_refreshed_at=then
    )


def lane_served(serving: str):
    """How many calls the fast lane served so far (None under WSGI)."""
    if serving != "asgi":
        return None
    from .serving import LANE

    return LANE.served


# --- the fake Slack provider: HTTP 200 {"ok": false, "error": "invalid_auth"} ----------------


def test_slack_revoked_token_refreshes_once_and_the_retried_answer_reaches_the_caller(
    fake_provider, staff_client, serving
):
    provider = fake_provider("slack")
    datasource = connect(provider, staff_client, expiry_body_rules=SLACK_RULES)
    age(datasource)
    provider.revoke_access_tokens()
    before = lane_served(serving)
    response = api_key_client().get(proxy_url(datasource, "conversations.list"))
    assert response.status_code == 200
    assert body_json(response)["ok"] is True
    assert len(provider.refresh_calls()) == 1
    fresh = Token.objects.get(datasource=datasource, user=None).access_token
    assert [(call.status, call.token == fresh) for call in provider.api()] == [
        (200, False),  # {"ok": false, "error": "invalid_auth"} with the revoked token
        (200, True),
    ]
    if before is not None:
        from .serving import LANE

        assert LANE.served == before + 1  # served by the lane itself, refresh included


def test_without_conditions_slacks_ok_false_is_passed_on_and_nothing_is_refreshed(
    fake_provider, staff_client, serving
):
    provider = fake_provider("slack")
    datasource = connect(provider, staff_client)
    age(datasource)
    provider.revoke_access_tokens()
    response = api_key_client().get(proxy_url(datasource, "conversations.list"))
    assert response.status_code == 200
    assert body_json(response) == DEAD
    assert provider.refresh_calls() == []


def test_a_condition_met_again_after_the_refresh_passes_the_answer_on(
    fake_provider, staff_client, serving
):
    """Refresh once, retry once: an API that keeps saying invalid_auth costs one refresh."""
    provider = fake_provider("slack")
    datasource = connect(provider, staff_client, expiry_body_rules=SLACK_RULES)
    age(datasource)
    provider.api_always(200, DEAD)
    response = api_key_client().get(proxy_url(datasource, "auth.test"))
    assert (response.status_code, body_json(response)) == (200, DEAD)
    assert len(provider.refresh_calls()) == 1
    assert len(provider.api()) == 2


@pytest.mark.parametrize("cap", [64, 65536])
def test_a_json_answer_above_the_cap_is_relayed_byte_identical_and_not_read(
    fake_provider, staff_client, serving, settings, cap
):
    provider = fake_provider("slack")
    datasource = connect(provider, staff_client, expiry_body_rules=SLACK_RULES)
    settings.DATASOURCES = {**settings.DATASOURCES, "EXPIRY_BODY_MAX_BYTES": cap}
    age(datasource)
    big = {**DEAD, "padding": "x" * (70_000 if cap > 64 else 40)}
    provider.api_always(200, big)
    response = api_key_client().get(proxy_url(datasource, "files.list"))
    assert body_of(response) == json.dumps(big).encode()
    assert provider.refresh_calls() == []
    assert len(provider.api()) == 1


def test_the_python_client_and_the_admin_test_hear_the_body_condition(fake_provider, staff_client):
    provider = fake_provider("slack")
    datasource = connect(provider, staff_client, expiry_body_rules=SLACK_RULES)
    age(datasource)
    provider.revoke_access_tokens()
    with Datasource.objects.get(pk=datasource.pk).session() as api:
        response = api.get("users.list")
        assert response.status_code == 200 and response.json()["ok"] is True
    assert len(provider.refresh_calls()) == 1

    age(datasource)
    provider.revoke_access_tokens()
    result = probe.run(Datasource.objects.get(pk=datasource.pk), "GET", "auth.test")
    assert (result.status, result.refreshed) == (200, True)
    assert '"ok": true' in result.preview
    assert len(provider.refresh_calls()) == 2

    # The Test button itself.
    age(datasource)
    provider.revoke_access_tokens()
    page = staff_client.post(
        f"/admin/datasources/datasource/{datasource.pk}/test/", {"method": "GET", "path": "x"}
    )
    assert page.status_code == 200 and b"&quot;ok&quot;: true" in page.content
    assert len(provider.refresh_calls()) == 3


# --- a scripted upstream: gzip, chunked, large and non-JSON answers -------------------------


class Scripted:
    """An API and its token endpoint (client credentials, every token valid until
    :meth:`revoke`) on one keep-alive HTTP/1.1 server. A call with a token that is not valid is
    answered ``dead`` (status, headers, body bytes; ``chunked`` sends the body in chunks of
    ``piece`` bytes, without a length). ``token_calls`` counts token requests."""

    def __init__(self) -> None:
        self.token_calls = 0
        self.live: set[str] = set()
        self.revoke_issued = False  # tokens issued from now on are dead too
        self.dead: dict[str, Any] = {}
        self.api_calls = 0
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, headers: list, body: bytes, chunked: bool, piece=4096):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for start in range(0, len(body), piece):
                        part = body[start : start + piece]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    scripted.token_calls += 1
                    token = f"tok-{scripted.token_calls}"
                    if not scripted.revoke_issued:
                        scripted.live.add(token)
                body = json.dumps(
                    {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
                ).encode()
                self._send(200, [("Content-Type", "application/json")], body, False)

            def do_GET(self) -> None:
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                with lock:
                    scripted.api_calls += 1
                    valid = token in scripted.live
                if valid:
                    self._send(200, [("Content-Type", "application/json")], b'{"ok": true}', False)
                    return
                dead = scripted.dead
                self._send(
                    dead["status"], dead["headers"], dead["body"], dead["chunked"], dead["piece"]
                )

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer_dead(
        self,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = "application/json; charset=utf-8",
        encoding: str | None = None,
        chunked: bool = False,
        piece: int = 4096,
    ) -> None:
        headers = [("Content-Type", content_type)]
        if encoding:
            headers.append(("Content-Encoding", encoding))
        self.dead = dict(status=status, headers=headers, body=body, chunked=chunked, piece=piece)

    def revoke(self, *, for_good: bool = False) -> None:
        self.live.clear()
        self.revoke_issued = for_good

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    upstream = Scripted()
    yield upstream
    upstream.stop()


def scripted_datasource(upstream: Scripted, rules: Any = SLACK_RULES) -> Datasource:
    datasource = make_datasource(
        slug="scripted",
        base_url=f"{upstream.base}/api/",
        grant_type="client_credentials",
        authorization_url="",
        access_token_url=f"{upstream.base}/token",
        expiry_body_rules=rules,
    )
    tokens.get_valid_token(datasource)
    age(datasource)
    assert upstream.token_calls == 1
    return datasource


def call(datasource: Datasource):
    _, key = create_api_key("body-rules")
    return Client(HTTP_AUTHORIZATION=f"Api-Key {key}").get(proxy_url(datasource, "me"))


GZIPPED_DEAD = gzip.compress(json.dumps(DEAD).encode())


@pytest.mark.parametrize("chunked", [False, True])
def test_a_gzip_encoded_small_json_answer_is_read_and_refreshes(scripted, serving, chunked):
    datasource = scripted_datasource(scripted)
    scripted.revoke()
    scripted.answer_dead(GZIPPED_DEAD, encoding="gzip", chunked=chunked, piece=7)
    response = call(datasource)
    assert (response.status_code, body_of(response)) == (200, b'{"ok": true}')
    assert scripted.token_calls == 2 and scripted.api_calls == 2


@pytest.mark.parametrize("chunked", [False, True])
def test_a_gzip_answer_that_stands_is_relayed_unchanged(scripted, serving, chunked):
    """The tokens issued after the refresh are dead too: the retried answer stands, and the
    caller gets its compressed bytes as sent, with their Content-Encoding."""
    datasource = scripted_datasource(scripted)
    scripted.revoke(for_good=True)
    scripted.answer_dead(GZIPPED_DEAD, encoding="gzip", chunked=chunked)
    response = call(datasource)
    assert response.status_code == 200
    assert response["Content-Encoding"] == "gzip"
    assert body_of(response) == GZIPPED_DEAD
    assert scripted.token_calls == 2 and scripted.api_calls == 2


@pytest.mark.parametrize(
    ("content_type", "encoding", "size"),
    [
        ("application/json", None, 200_000),  # larger than EXPIRY_BODY_MAX_BYTES
        ("application/json", None, 65_537),  # one byte over
        ("text/plain", None, 100),  # not JSON
        ("application/json", "br", 100),  # not decoded here
    ],
)
@pytest.mark.parametrize("chunked", [False, True])
def test_answers_not_to_be_read_are_relayed_byte_identical_and_nothing_is_refreshed(
    scripted, serving, content_type, encoding, size, chunked
):
    datasource = scripted_datasource(scripted)
    scripted.revoke()
    prefix = b'{"ok": false, "error": "invalid_auth", "padding": "'
    body = prefix + b"y" * max(0, size - len(prefix) - 2) + b'"}'
    scripted.answer_dead(
        body, content_type=content_type, encoding=encoding, chunked=chunked, piece=5000
    )
    for _ in range(2):  # the connection the answer came on is fit to be used again
        response = call(datasource)
        assert response.status_code == 200
        assert body_of(response) == body
    assert scripted.token_calls == 1 and scripted.api_calls == 2


def test_a_json_answer_just_under_the_cap_without_a_length_is_read(scripted, serving):
    datasource = scripted_datasource(scripted)
    scripted.revoke()
    prefix = b'{"ok": false, "error": "token_revoked", "padding": "'
    body = prefix + b"z" * (65_536 - len(prefix) - 2) + b'"}'
    assert len(body) == 65_536
    scripted.answer_dead(body, chunked=True, piece=1000)
    response = call(datasource)
    assert (response.status_code, body_of(response)) == (200, b'{"ok": true}')
    assert scripted.token_calls == 2


def test_the_python_client_reads_a_gzip_answer_as_requests_would(scripted):
    datasource = scripted_datasource(scripted)
    scripted.revoke(for_good=True)
    scripted.answer_dead(GZIPPED_DEAD, encoding="gzip", chunked=True, piece=9)
    with datasource.session() as api:
        response = api.get("me")
        assert response.json() == DEAD  # decoded by requests, as without conditions
        streamed = api.get("me", stream=True)
        assert streamed.raw.read(decode_content=False) == GZIPPED_DEAD
    # The second call's rejection falls within REJECTION_COOLDOWN of the first one's refresh:
    # it is passed on without another token request.
    assert scripted.token_calls == 2


# --- the admin form, import and export --------------------------------------------------------


def form_data(datasource: Datasource, **changes: Any) -> dict[str, Any]:
    from .test_admin import form_data as base

    return base(datasource, **changes)


def test_the_admin_form_saves_conditions_and_refuses_a_malformed_one(staff_client):
    from .test_admin import change_url

    datasource = make_datasource()
    response = staff_client.post(
        change_url(datasource),
        form_data(datasource, expiry_body_rules=json.dumps(SLACK_RULES)),
    )
    assert response.status_code == 302, response.content[:2000]
    assert Datasource.objects.get(pk=datasource.pk).expiry_body_rules == SLACK_RULES

    bad = [SLACK_RULES[0], {"path": "error", "values": []}]
    response = staff_client.post(
        change_url(datasource), form_data(datasource, expiry_body_rules=json.dumps(bad))
    )
    assert response.status_code == 200
    assert (
        "Condition 2: &quot;values&quot; must be a non-empty list of strings, numbers or "
        "true/false" in response.content.decode()
    )
    response = staff_client.post(
        change_url(datasource), form_data(datasource, expiry_body_rules="[{path: error}]")
    )
    assert response.status_code == 200
    assert "Write a JSON list of conditions" in response.content.decode()
    assert Datasource.objects.get(pk=datasource.pk).expiry_body_rules == SLACK_RULES

    response = staff_client.post(
        change_url(datasource), form_data(datasource, expiry_body_rules="")
    )
    assert response.status_code == 302
    assert Datasource.objects.get(pk=datasource.pk).expiry_body_rules == []


def test_the_form_shows_the_conditions_with_the_status_codes(staff_client):
    from .test_admin import change_url

    datasource = make_datasource(expiry_body_rules=SLACK_RULES)
    page = staff_client.get(change_url(datasource)).content.decode()
    assert 'name="expiry_body_rules"' in page
    assert page.index('name="expiry_status_codes"') < page.index('name="expiry_body_rules"')
    assert "token_expired" in page


def import_file(tmp_path, entries) -> str:
    path = tmp_path / "datasources.json"
    path.write_text(json.dumps(entries))
    return str(path)


def entry(**fields: Any) -> dict[str, Any]:
    return {
        "name": "Slack",
        "slug": "slack",
        "base_url": "https://slack.com/api/",
        "grant_type": "client_credentials",
        "access_token_url": "https://slack.com/api/oauth.v2.access",
        "client_id": "id",
        "client_secret": "s3cret-value",
        **fields,
    }


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"path": "error"}, "must be a list, not an object."),
        ([{"path": "error..code", "values": ["x"]}], 'Condition 1: "path" must be'),
        ([{"path": "error", "values": ["x"], "flags": "i"}], 'unknown key(s) "flags"'),
        ([SLACK_RULES[0], {"path": "e", "values": [None]}], 'Condition 2: "values" must be'),
    ],
)
def test_import_refuses_malformed_conditions_and_writes_nothing(tmp_path, rules, message):
    with pytest.raises(config_io.ImportFailed) as failed:
        config_io.import_datasources([entry(expiry_body_rules=rules)])
    assert any(
        line.startswith("entry 1 (slug 'slack'): expiry_body_rules: ") and message in line
        for line in failed.value.errors
    ), failed.value.errors
    assert not Datasource.objects.exists()


def test_export_and_import_round_trip_the_conditions(tmp_path, capsys):
    config_io.import_datasources([entry(expiry_body_rules=SALESFORCE_RULES)])
    call_command("export_datasources")
    exported = json.loads(capsys.readouterr().out)
    assert exported[0]["expiry_body_rules"] == SALESFORCE_RULES
    Datasource.objects.filter(slug="slack").update(expiry_body_rules=[])
    exported[0]["client_secret"] = "s3cret-value"
    call_command("import_datasources", import_file(tmp_path, exported), stdout=io.StringIO())
    assert Datasource.objects.get(slug="slack").expiry_body_rules == SALESFORCE_RULES


SALESFORCE_RULES = presets.all_presets()["salesforce"]["expiry_body_rules"]


def test_the_presets_set_the_documented_conditions():
    found = {
        key: presets.all_presets()[key].get("expiry_body_rules") for key in presets.all_presets()
    }
    assert found["slack"] == [
        {
            "path": "error",
            "values": ["invalid_auth", "token_expired", "token_revoked", "account_inactive"],
        }
    ]
    assert found["salesforce"] == [{"path": "*.errorCode", "values": ["INVALID_SESSION_ID"]}]
    assert found["microsoft"] == [{"path": "error.code", "values": ["InvalidAuthenticationToken"]}]
    for key, preset in presets.all_presets().items():
        assert presets.problems(preset) == [], key
