from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class DatasourcesConfig(AppConfig):
    name = "datasources"
    verbose_name = _("OAuth2 datasources")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, encryption  # noqa: F401
        from .ops import logfilters, notifications  # noqa: F401  (emails the owner)
        from .proxy import cache  # noqa: F401  (empty the caches on edits)
        from .webhooks import events  # noqa: F401  (the signal receivers)

        logfilters.install()
