import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from datasources.models import Datasource

from .conftest import SECRET, make_datasource

pytestmark = pytest.mark.django_db

VALID = {
    "name": "CRM",
    "slug": "crm",
    "base_url": "https://crm.example.com/api/",
    "grant_type": "client_credentials",
    "access_token_url": "https://crm.example.com/oauth/token",
    "client_id": "crm-client",
    "client_secret": {"env": "DATASOURCE_SECRET_CRM"},
    "scopes": "read,write",
}


def write(tmp_path, data) -> str:
    path = tmp_path / "datasources.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_import_creates_and_upserts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATASOURCE_SECRET_CRM", "from-the-environment")
    call_command("import_datasources", write(tmp_path, [VALID]))
    crm = Datasource.objects.get(slug="crm")
    assert crm.client_secret == "from-the-environment"
    assert crm.scopes == "read write"
    changed = {**VALID, "name": "CRM v2"}
    del changed["client_secret"]  # absent: the stored secret is kept
    call_command("import_datasources", write(tmp_path, [changed]))
    crm.refresh_from_db()
    assert (crm.name, crm.client_secret) == ("CRM v2", "from-the-environment")
    assert Datasource.objects.count() == 1
    assert "updated crm" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([{**VALID, "base_url": "not a url"}], "entry 2 (slug 'crm'): base_url"),
        (
            [{**VALID, "client_secret": {"env": "DATASOURCE_SECRET_MISSING"}}],
            "DATASOURCE_SECRET_MISSING is not set",
        ),
        ([{**VALID, "bogus": 1}], "unknown field(s): bogus"),
        ([VALID, VALID], "appears more than once"),
        ([{**VALID, "grant_type": "authorization_code"}], "authorization_url"),
        ([{**VALID, "custom_auth_params": {"state": "x"}}], "cannot be overridden: state"),
        ({"not": "a list"}, "JSON list"),
    ],
)
def test_bad_file_changes_nothing(tmp_path, monkeypatch, entries, expected):
    monkeypatch.setenv("DATASOURCE_SECRET_CRM", "s")
    existing = make_datasource()
    good_second = {**VALID, "slug": "good", "name": "Good"}
    payload = [good_second, *entries] if isinstance(entries, list) else entries
    with pytest.raises(CommandError) as err:
        call_command("import_datasources", write(tmp_path, payload))
    assert expected in str(err.value)
    assert "Nothing was imported" in str(err.value) or "JSON list" in str(err.value)
    assert list(Datasource.objects.values_list("slug", flat=True)) == [existing.slug]


def test_invalid_json_is_a_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[{")
    with pytest.raises(CommandError, match="not valid JSON"):
        call_command("import_datasources", str(path))


def test_export_never_contains_secrets_and_round_trips(tmp_path, capsys, monkeypatch):
    make_datasource()
    call_command("export_datasources")
    out = capsys.readouterr().out
    assert SECRET not in out
    exported = json.loads(out)
    assert exported[0]["slug"] == "example"
    assert "client_secret" not in exported[0]
    Datasource.objects.all().delete()
    exported[0]["client_secret"] = {"env": "DATASOURCE_SECRET_EXAMPLE"}
    monkeypatch.setenv("DATASOURCE_SECRET_EXAMPLE", SECRET)
    call_command("import_datasources", write(tmp_path, exported))
    assert Datasource.objects.get(slug="example").client_secret == SECRET


def test_management_command_exit_code_is_nonzero_without_traceback(tmp_path):
    import subprocess
    import sys

    from .helpers import subprocess_env

    path = write(tmp_path, [{**VALID, "base_url": "nope"}])
    result = subprocess.run(
        [sys.executable, "manage.py", "import_datasources", path],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert result.returncode != 0
    assert "base_url" in result.stderr
    assert "Traceback" not in result.stderr


def test_retry_settings_are_exported_and_imported(tmp_path, capsys, monkeypatch):
    make_datasource(retry_count=3, retry_statuses="503,429", retry_budget=20)
    call_command("export_datasources")
    exported = json.loads(capsys.readouterr().out)
    assert {k: exported[0][k] for k in exported[0] if k.startswith("retry")} == {
        "retry_count": 3,
        "retry_statuses": "429,503",
        "retry_on_connection_errors": True,
        "retry_budget": 20,
    }
    monkeypatch.setenv("DATASOURCE_SECRET_CRM", "s")
    call_command(
        "import_datasources",
        write(tmp_path, [{**VALID, "retry_count": 2, "retry_on_connection_errors": False}]),
    )
    crm = Datasource.objects.get(slug="crm")
    assert (crm.retry_count, crm.retry_on_connection_errors) == (2, False)
    with pytest.raises(CommandError, match="retry_statuses"):
        call_command("import_datasources", write(tmp_path, [{**VALID, "retry_statuses": "401"}]))
    with pytest.raises(CommandError, match="retry_count"):
        call_command("import_datasources", write(tmp_path, [{**VALID, "retry_count": "3"}]))
