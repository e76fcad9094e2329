"""Provider presets: a data file (presets/providers.json), not code. Choosing one pre-fills the
admin's add form; every value stays editable. ``{tenant}``-style placeholders must be replaced:
the form refuses any field that still has one, naming it.

What a preset may set derives from the settings' groups (:mod:`datasources.models.groups`): the
configuration fields, each with the JSON type its model field takes; never a secret.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from ..models import CONFIG_FIELDS
from ..models.groups import json_types, shape_problem

PRESETS_FILE = Path(__file__).resolve().parent / "presets" / "providers.json"
#: Keys that describe the provider rather than fill a form field.
DESCRIPTIVE = frozenset({"label", "notes", "sends_expires_in"})


@cache
def all_presets() -> dict[str, dict[str, Any]]:
    with PRESETS_FILE.open(encoding="utf-8") as handle:
        return json.load(handle)


def initial_for(key: str) -> dict[str, Any]:
    """Form initial data for a preset (unknown keys: empty)."""
    preset = all_presets().get(key)
    if preset is None:
        return {}
    # JSON fields get the object itself: the form field renders it as JSON once (a string here
    # would be shown as a JSON string, and saved as one).
    initial = {k: v for k, v in preset.items() if k in CONFIG_FIELDS}
    initial.setdefault("grant_type", "authorization_code")
    return initial


def problems(preset: dict[str, Any]) -> list[str]:
    """What is wrong with one preset: keys that are neither a setting nor descriptive (a typo
    would otherwise be dropped without a word), values of the wrong JSON type or shape."""
    found = []
    for name, value in preset.items():
        if name in DESCRIPTIVE:
            continue
        if name not in CONFIG_FIELDS:
            found.append(f"{name}: not a datasource setting a preset may fill")
            continue
        expected = json_types(name)
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            found.append(f"{name}: {type(value).__name__} is not of the setting's type")
        elif problem := shape_problem(name, value):
            found.append(f"{name}: {problem}")
    if not isinstance(preset.get("label"), str):
        found.append("label: every preset needs a label")
    return found
