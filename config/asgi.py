import os

from django.core.asgi import get_asgi_application

from config.paths import ensure_data_dirs

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_asgi_application()
ensure_data_dirs()
