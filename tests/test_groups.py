"""A datasource setting is declared once: its model field and its group (datasources.models.groups).
The admin's fieldsets, the page's show/hide rules, import/export and the presets' checks all
derive from them, so a new setting needs no edit anywhere else."""

from __future__ import annotations

import json

import pytest
from django.contrib.admin.sites import site
from fernet_fields import EncryptedField

from datasources.admin import fieldsets as layout
from datasources.admin import presets
from datasources.admin.forms import DatasourceForm
from datasources.models import (
    CONFIG_FIELDS,
    DATASOURCE_GROUPS,
    WRITE_ONLY_FIELDS,
    Datasource,
    groups,
    validation,
)
from datasources.ops import config_io

#: Columns that are not settings: bookkeeping, and the DPoP key pair the app generates itself.
NOT_SETTINGS = {"id", "created_at", "updated_at", "dpop_private_key", "dpop_jkt"}


def settings_of_the_model() -> set[str]:
    return {f.name for f in Datasource._meta.concrete_fields} - NOT_SETTINGS


def admin_rows() -> list[str]:
    admin = site._registry[Datasource]
    return [name for _title, options in admin.fieldsets for name in options["fields"]]


def test_every_setting_of_the_model_is_in_exactly_one_group():
    grouped = groups.grouped_fields()
    assert len(grouped) == len(set(grouped)), "a setting is in two groups"
    assert set(grouped) == settings_of_the_model()
    assert {f.name for f in Datasource._meta.concrete_fields if not f.editable} <= NOT_SETTINGS


@pytest.mark.parametrize("name", sorted(settings_of_the_model()))
def test_each_setting_reaches_the_admin_export_and_presets(name, db):
    """Inspects every setting: a field added to the model and to a group is on the admin page,
    in the form, in export and import (or write-only), and accepted in a preset, with no other
    edit."""
    assert name in admin_rows()
    if isinstance(Datasource._meta.get_field(name), EncryptedField):
        assert name in WRITE_ONLY_FIELDS
        assert name in config_io.SECRET_FIELDS and name not in config_io.EXPORTED_FIELDS
        assert presets.problems({"label": "x", name: "secret"}), "a preset never holds a secret"
        return
    if not groups.is_config(name):  # the owner (a user here), discovered metadata
        assert name not in CONFIG_FIELDS
        return
    assert name in CONFIG_FIELDS and name in DatasourceForm._meta.fields
    assert name in config_io.EXPORTED_FIELDS and name in config_io.IMPORTED_FIELDS
    datasource = Datasource.objects.create(
        name="n", slug="s", base_url="https://a/", access_token_url="https://a/t", client_id="c"
    )
    exported = config_io.export_datasources()[0]
    assert name in exported
    value = exported[name]
    assert presets.problems({"label": "x", name: value}) == []
    assert presets.problems({"label": "x", name: [value]}), "a value of another JSON type"
    assert datasource.pk


def test_a_group_added_to_the_declaration_reaches_the_admin_page(monkeypatch):
    """The fieldsets and the page's rules are read from the declaration, not copied from it."""
    extra = groups.Group(
        "quirks",
        "Provider quirks",
        ("audience",),
        folded=True,
        when={"audience": groups.CODE_GRANT},
    )
    monkeypatch.setattr(layout, "DATASOURCE_GROUPS", (*DATASOURCE_GROUPS, extra))
    monkeypatch.setattr(groups, "DATASOURCE_GROUPS", (*DATASOURCE_GROUPS, extra))
    titles = [title for title, _options in layout.datasource_fieldsets()]
    assert "Provider quirks" in titles
    assert layout.datasource_fieldsets()[-2][1] == {
        "classes": ("collapse",),
        "fields": ("audience",),
    }
    assert layout.field_rules()["shown"]["audience"] == [{"grant_type": ["authorization_code"]}]


def test_the_page_carries_the_show_hide_rules(staff_client):
    html = staff_client.get("/admin/datasources/datasource/add/").content.decode()
    start = html.index('id="datasource-field-rules"')
    data = html[html.index(">", start) + 1 : html.index("</script>", start)]
    rules = json.loads(data)
    assert rules["shown"]["authorization_url"] == [{"grant_type": ["authorization_code"]}]
    assert {"grant_type": ["jwt_bearer"]} in rules["shown"]["private_key_file"]
    assert rules["shown"]["service_account_key"] == [{"grant_type": ["jwt_bearer"]}]
    assert "secret_hold" not in rules["shown"]
    assert rules["opened"]["tls_client_certificate"][0]["client_authentication"] == [
        "tls_client_auth",
        "self_signed_tls_client_auth",
    ]
    # Every rule names a row of the page.
    assert set(rules["shown"]) <= set(admin_rows())


def test_the_script_names_no_field():
    from pathlib import Path

    import datasources

    script = (
        Path(datasources.__file__).parent / "static" / "datasources" / "datasource_form.js"
    ).read_text()
    for name in groups.grouped_fields():
        assert f'"{name}"' not in script, name


def test_shipped_presets_have_no_problems():
    assert {key: presets.problems(p) for key, p in presets.all_presets().items()} == {
        key: [] for key in presets.all_presets()
    }
    assert presets.problems({"label": "x", "acces_token_url": "https://a/t"}) == [
        "acces_token_url: not a datasource setting a preset may fill"
    ]
    assert presets.problems({"label": "x", "use_pkce": "yes"})


def test_the_rules_only_report_and_never_write():
    datasource = Datasource(
        name="n",
        slug="s",
        base_url="https://a/",
        access_token_url="https://a/t",
        client_id="c",
        scopes="b, a",
        retry_statuses="503, 429",
        default_headers=None,
    )
    outcome = validation.check(datasource)
    assert outcome.problems == {
        "authorization_url": "The authorization code grant needs an authorization URL."
    }
    assert outcome.values["scopes"] == "b a"
    assert outcome.values["retry_statuses"] == "429,503"
    assert outcome.values["default_headers"] == {}
    assert datasource.retry_statuses == "503, 429" and datasource.default_headers is None
