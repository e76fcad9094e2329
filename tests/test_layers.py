"""What import-linter cannot say (it checks only top-level external packages): the call core and
everything below it know no Django request, response or template, so the view, the lane, the
Python client and the admin's Test each translate their own types around the same steps."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "datasources"
BELOW_SERVING = ["calls", "tokens", "authserver", "models", "security"]
SERVING_TYPES = ("django.http", "django.shortcuts", "django.template", "django.views.generic")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", BELOW_SERVING)
def test_the_call_core_and_below_import_no_serving_types(package):
    offenders = {
        f"{path.relative_to(APP.parent)}: {module}"
        for path in (APP / package).rglob("*.py")
        for module in imported_modules(path)
        if module.startswith(SERVING_TYPES)
    }
    assert not offenders


def test_the_check_sees_an_import_of_a_serving_type(tmp_path):
    """The check above can fail."""
    module = tmp_path / "bad.py"
    module.write_text("from django.http import HttpResponse\n")
    assert "django.http" in imported_modules(module)
