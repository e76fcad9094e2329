import json
import sys

from django.core.management.base import BaseCommand, CommandError

from datasources.config_io import ImportFailed, import_datasources


class Command(BaseCommand):
    help = (
        "Create or update datasources from a JSON file (a list of objects, upsert by slug). "
        'A client_secret may be {"env": "VAR"}. Nothing is written unless every entry is valid.'
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="Path to the JSON file, or - for standard input.")

    def handle(self, *args, file: str, **options):
        try:
            if file == "-":
                entries = json.load(sys.stdin)
            else:
                with open(file, encoding="utf-8") as handle:
                    entries = json.load(handle)
        except OSError as err:
            raise CommandError(f"Cannot read {file}: {err.strerror}.") from None
        except json.JSONDecodeError as err:
            raise CommandError(
                f"{file} is not valid JSON: {err.msg} (line {err.lineno})."
            ) from None
        try:
            result = import_datasources(entries)
        except ImportFailed as err:
            raise CommandError(
                "Nothing was imported; fix these problems first:\n  " + "\n  ".join(err.errors)
            ) from None
        for slug in result.created:
            self.stdout.write(f"created {slug}")
        for slug in result.updated:
            self.stdout.write(f"updated {slug}")
        self.stdout.write(
            self.style.SUCCESS(
                f"Imported {len(result.created) + len(result.updated)} datasource(s): "
                f"{len(result.created)} created, {len(result.updated)} updated."
            )
        )
