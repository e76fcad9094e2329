import os

import django
from django.core.handlers.asgi import ASGIHandler

from config.paths import ensure_data_dirs

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
# What get_asgi_application() does, with the data directories created in between: WhiteNoise's
# middleware looks for STATIC_ROOT when the handler is built and warns if it is missing.
django.setup(set_prefix=False)
ensure_data_dirs()

from datasources.asgi import with_proxy_lane  # noqa: E402

# The proxy's URLs take the fast path (datasources/asgi.py, as docs/install.md tells a host
# project to do); everything else is Django's.
application = with_proxy_lane(ASGIHandler())
