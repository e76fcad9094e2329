"""The builder's UI in the Django admin: the ModelAdmins (:mod:`.modeladmins`), the form, the
datasource page's buttons (:mod:`.buttons`), the dashboard, plain-words errors, Test, bulk jobs,
presets, the pages that show an API key or a webhook secret once.

An entry point: may import anything below it (calls, tokens, authserver, authorize, models),
nothing imports it.
"""

from . import modeladmins  # noqa: F401  (registers the ModelAdmins with the admin site)
