import json

from django.core.management.base import BaseCommand

from datasources.ops.config_io import export_datasources


class Command(BaseCommand):
    help = "Print every datasource as JSON that import_datasources accepts. Secrets are never included."

    def handle(self, *args, **options):
        self.stdout.write(json.dumps(export_datasources(), indent=2, ensure_ascii=False))
