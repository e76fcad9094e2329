import os

from django.core.wsgi import get_wsgi_application

from config.paths import ensure_data_dirs

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()
ensure_data_dirs()
