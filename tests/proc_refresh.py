"""Run in a separate process by test_tokens: wait for a start time, then ask for a token."""

import os
import sys
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

from datasources.models import Datasource  # noqa: E402

slug, start_at = sys.argv[1], float(sys.argv[2])
datasource = Datasource.objects.get(slug=slug)
while time.time() < start_at:
    time.sleep(0.001)
print(datasource.get_access_token(), flush=True)
