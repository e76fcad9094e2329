import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from datasources.ops.config_io import ImportFailed, import_datasources, read_file


class Command(BaseCommand):
    help = (
        "Create or update datasources from a JSON file (a list of objects, upsert by slug). "
        'A client_secret may be {"env": "VAR"} with VAR named DATASOURCE_SECRET_… (the '
        "IMPORT_ENV_PREFIX setting); a private_key or service_account_key also "
        '{"file": "path"} inside the import file\'s directory. Nothing is written unless '
        "every entry is valid."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="Path to the JSON file, or - for standard input.")

    def handle(self, *args, file: str, **options):
        try:
            if file == "-":
                entries = read_file(sys.stdin.buffer, "standard input")
                base_dir = None
            else:
                with open(file, "rb") as handle:
                    entries = read_file(handle, file)
                base_dir = Path(file).parent
            result = import_datasources(entries, base_dir=base_dir)
        except OSError as err:
            raise CommandError(f"Cannot read {file}: {err.strerror}.") from None
        except ImportFailed as err:
            if len(err.errors) == 1:
                raise CommandError(f"Nothing was imported: {err.errors[0]}") from None
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
