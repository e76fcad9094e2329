"""The data directory (SQLite file, filesystem broker, beat schedule), created by the entry points
(``manage.py``, WSGI/ASGI, the Celery worker and beat) rather than by importing the settings."""

from __future__ import annotations

from pathlib import Path


def broker_folders(data_dir: Path) -> dict[str, Path]:
    """Where kombu's filesystem transport keeps messages (used when no broker URL is set)."""
    queue = Path(data_dir) / "broker"
    return {"in": queue / "in", "processed": queue / "processed", "control": queue / "control"}


def filesystem_transport_options(data_dir: Path) -> dict[str, object]:
    """kombu's filesystem transport options for a broker kept under ``data_dir``."""
    folders = broker_folders(data_dir)
    return {
        "data_folder_in": str(folders["in"]),
        "data_folder_out": str(folders["in"]),
        "processed_folder": str(folders["processed"]),
        # Exchange tables; kombu's default is ./control, relative to the working directory.
        "control_folder": str(folders["control"]),
        "store_processed": False,
    }


def ensure_data_dirs() -> None:
    """Create DATA_DIR, STATIC_ROOT (WhiteNoise warns about a missing one) and the filesystem
    broker's folders when that broker is used."""
    from django.conf import settings

    data_dir = Path(settings.DATA_DIR)
    data_dir.mkdir(parents=True, exist_ok=True)
    Path(settings.STATIC_ROOT).mkdir(parents=True, exist_ok=True)
    if str(getattr(settings, "CELERY_BROKER_URL", "")).startswith("filesystem://"):
        for folder in broker_folders(data_dir).values():
            folder.mkdir(parents=True, exist_ok=True)
