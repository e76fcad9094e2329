"""The app's Celery beat schedule, for the host project's Celery app.

The app has no Celery app of its own: the host's (``celery -A <project>``) runs its tasks. What
it needs from beat is a few periodic entries; :func:`install` adds them to the host's app in one
line, next to ``app.autodiscover_tasks()``::

    import datasources.beat

    app = Celery("config")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.autodiscover_tasks()
    datasources.beat.install(app)

Hosts that build ``beat_schedule`` themselves (or use django-celery-beat) can take the entries
from :func:`beat_schedule` instead.
"""

from __future__ import annotations

from typing import Any

from celery import Celery


def beat_schedule() -> dict[str, dict[str, Any]]:
    """The app's periodic tasks, with intervals from ``settings.DATASOURCES`` as they are now.

    A function, not a module-level dict: the intervals are settings, read when the schedule is
    built (after Django's settings are configured), not when this module is imported.
    """
    from .conf import app_settings

    def every(seconds: float) -> dict[str, Any]:
        # A tick that waited longer than its interval in the broker is dropped: the next one is
        # already on its way, and a backlog of sweeps would only repeat the same work.
        return {"schedule": float(seconds), "options": {"expires": float(seconds)}}

    return {
        # The sweep fans out one refresh task per due token.
        "datasources-sweep": {
            "task": "datasources.tasks.sweep",
            **every(app_settings.SWEEP_INTERVAL),
        },
        # Snapshots of the proxy counters for the admin's 24-hour usage charts.
        "datasources-usage-samples": {
            "task": "datasources.tasks.sample_usage",
            **every(app_settings.USAGE_SAMPLE_INTERVAL),
        },
        # Webhook deliveries whose task was lost (or whose worker died); their retention.
        "datasources-webhook-sweep": {
            "task": "datasources.tasks.sweep_webhooks",
            **every(app_settings.WEBHOOK_SWEEP_INTERVAL),
        },
        # The call log's retention.
        "datasources-prune-call-log": {
            "task": "datasources.tasks.prune_call_log",
            **every(app_settings.CALL_LOG_PRUNE_INTERVAL),
        },
    }


def install(app: Celery) -> None:
    """Merge :func:`beat_schedule` into ``app.conf.beat_schedule`` once the app is finalized.

    Why on finalize: the schedule reads Django settings, which the host's ``celery.py`` may
    not have configured yet when it calls this (``DJANGO_SETTINGS_MODULE`` is set there, but
    nothing has loaded the settings). The host's own entries are kept, and win over ours on a
    name clash, so a host can retune one of them under the same name.
    """
    if app.finalized:
        _merge(app)
    else:
        app.on_after_finalize.connect(_merge, weak=False, dispatch_uid="datasources.beat.install")


def _merge(sender: Celery, **kwargs: object) -> None:
    """``on_after_finalize`` receiver (module level: Celery's signals hold receivers weakly by
    default, and one connection per app however often :func:`install` is called)."""
    sender.conf.beat_schedule = {**beat_schedule(), **(sender.conf.beat_schedule or {})}
