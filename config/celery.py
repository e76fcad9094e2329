"""Celery app for the project: configuration from Django settings under the CELERY_ namespace."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import beat_init, celeryd_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def _install_beat_schedule(sender: Celery, **kwargs: object) -> None:
    """Beat runs the sweep every DATASOURCES["SWEEP_INTERVAL"] seconds; the sweep fans out."""
    from datasources.conf import app_settings

    sender.conf.beat_schedule = {
        "datasources-sweep": {
            "task": "datasources.tasks.sweep",
            "schedule": float(app_settings.SWEEP_INTERVAL),
            "options": {"expires": float(app_settings.SWEEP_INTERVAL)},
        },
        # Snapshots of the proxy counters for the admin's 24-hour usage charts.
        "datasources-usage-samples": {
            "task": "datasources.tasks.sample_usage",
            "schedule": float(app_settings.USAGE_SAMPLE_INTERVAL),
            "options": {"expires": float(app_settings.USAGE_SAMPLE_INTERVAL)},
        },
        # Webhook deliveries whose task was lost (or whose worker died); their retention.
        "datasources-webhook-sweep": {
            "task": "datasources.tasks.sweep_webhooks",
            "schedule": float(app_settings.WEBHOOK_SWEEP_INTERVAL),
            "options": {"expires": float(app_settings.WEBHOOK_SWEEP_INTERVAL)},
        },
        # The call log's retention.
        "datasources-prune-call-log": {
            "task": "datasources.tasks.prune_call_log",
            "schedule": float(app_settings.CALL_LOG_PRUNE_INTERVAL),
            "options": {"expires": float(app_settings.CALL_LOG_PRUNE_INTERVAL)},
        },
    }


@celeryd_init.connect
@beat_init.connect
def _data_dirs(**kwargs: object) -> None:
    """The worker and beat create DATA_DIR (beat schedule, filesystem broker) on start."""
    from config.paths import ensure_data_dirs

    ensure_data_dirs()
