"""Celery app for the project: configuration from Django settings under the CELERY_ namespace."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import beat_init, celeryd_init

import datasources.beat

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
# The app's tasks (datasources.tasks, which also holds the worker's database-failover hooks) and
# its beat schedule, as docs/install.md tells a host project to load them.
app.autodiscover_tasks()
datasources.beat.install(app)


@celeryd_init.connect
@beat_init.connect
def _data_dirs(**kwargs: object) -> None:
    """The worker and beat create DATA_DIR (beat schedule, filesystem broker) on start."""
    from config.paths import ensure_data_dirs

    ensure_data_dirs()
