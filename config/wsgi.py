import os

import django
from django.core.handlers.wsgi import WSGIHandler

from config.paths import ensure_data_dirs

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# What get_wsgi_application() does, with the data directories created in between: WhiteNoise's
# middleware looks for STATIC_ROOT when the handler is built and warns if it is missing.
django.setup(set_prefix=False)
ensure_data_dirs()
application = WSGIHandler()
