"""Every DATASOURCES setting can be set from the environment, and docs/operations.md lists them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from datasources.conf import DEFAULTS, ENV_PREFIX, settings_from_environ

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("variable", "raw", "expected"),
    [
        ("LEASE_WAIT", "7.5", 7.5),  # float default
        ("LEASE_WAIT", " 3 ", 3.0),
        ("LEASE_SECONDS", "90", 90),  # int default stays an int
        ("LEASE_SECONDS", "2.5", 2.5),  # seconds may be fractional
        ("SWEEP_BATCH_SIZE", "500", 500),
        ("PROXY_FAST_LANE", "0", False),
        ("PROXY_FAST_LANE", "off", False),
        ("PROXY_FAST_LANE", "Yes", True),
        ("TRACING", "1", True),
        ("TRACING", "true", True),
        ("PUBLIC_BASE_URL", "https://ds.example.com", "https://ds.example.com"),
        ("METRICS_TOKEN", "", ""),
    ],
)
def test_a_variable_sets_its_setting_as_the_default_type(variable, raw, expected):
    got = settings_from_environ({ENV_PREFIX + variable: raw})
    assert got == {variable: expected}
    assert type(got[variable]) is type(expected)


@pytest.mark.parametrize(
    ("variable", "raw", "says"),
    [
        ("LEASE_WAIT", "soon", "must be a number"),
        ("LEASE_WAIT", "nan", "must be a number"),
        ("REJECTION_COOLDOWN", "inf", "must be a number"),
        ("SWEEP_BATCH_SIZE", "2.5", "must be a whole number"),
        ("WEBHOOK_MAX_ATTEMPTS", "1e0.5", "must be a number"),
        ("PROXY_FAST_LANE", "maybe", "must be a flag"),
    ],
)
def test_a_value_that_does_not_parse_is_refused_by_name_never_by_value(variable, raw, says):
    with pytest.raises(ImproperlyConfigured) as refused:
        settings_from_environ({ENV_PREFIX + variable: raw})
    assert ENV_PREFIX + variable in str(refused.value)
    assert says in str(refused.value)
    assert raw not in str(refused.value).replace(ENV_PREFIX + variable, "")


def test_unset_variables_and_unknown_names_change_nothing():
    assert settings_from_environ({}) == {}
    assert settings_from_environ({"DATASOURCES_NOT_A_SETTING": "1", "LEASE_WAIT": "1"}) == {}


def test_every_setting_is_in_the_operations_table_with_its_variable_and_default():
    text = (ROOT / "docs" / "operations.md").read_text()
    rows = {
        match[1]: (match[2], match[3])
        for match in re.finditer(r"^\| `([A-Z_]+)` \| `([A-Z_]+)` \| ([^|]+) \|", text, re.M)
    }
    assert set(rows) == set(DEFAULTS)
    for name, default in DEFAULTS.items():
        variable, shown = rows[name]
        assert variable == ENV_PREFIX + name
        if isinstance(default, bool):
            expected = "`1`" if default else "`0`"
        elif default == "":
            expected = "empty"
        else:
            expected = f"`{default}`"
        assert shown.strip() == expected, name


def test_the_project_reads_them_at_start_and_the_checks_see_them(tmp_path):
    """The demo project's settings take any DATASOURCES_* variable (here two that had no line of
    their own before), and a lease too short to keep alive is refused by the system check."""
    env = {
        **os.environ,
        "ENV_FILE": "/dev/null",
        "SECRET_KEY": "x" * 50,
        "FERNET_KEYS": "HvAdBr48_ufPavu9UbCM2vsspYZhDsYyQgX-Z_zlu_4=",
        "DATA_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATASOURCES_LEASE_WAIT": "7",
        "DATASOURCES_REJECTION_COOLDOWN": "12.5",
    }
    env.pop("DATABASE_URL", None)
    shown = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            "from datasources.conf import app_settings as s; "
            "print(s.LEASE_WAIT, s.REJECTION_COOLDOWN, s.LEASE_SECONDS)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    # (the shell may first say how many objects it imported)
    assert shown.stdout.splitlines()[-1].split() == ["7.0", "12.5", "5"]

    env["DATASOURCES_LEASE_SECONDS"] = "1.5"  # below the shortest lease the keeper can hold
    checked = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode != 0
    assert "datasources.E003" in checked.stderr
