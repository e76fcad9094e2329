from django.core.management.base import BaseCommand, CommandError

from datasources.apikeys import create_api_key
from datasources.models import Datasource


class Command(BaseCommand):
    help = (
        "Create an API key for the proxy and print it once on its own line. Only a hash is "
        "stored: the key cannot be shown again."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="Who or what uses the key.")
        parser.add_argument(
            "--datasource",
            action="append",
            default=[],
            metavar="SLUG",
            help="Restrict the key to this datasource (repeatable). Default: all datasources.",
        )

    def handle(self, *args, name: str, datasource: list[str], **options):
        found = list(Datasource.objects.filter(slug__in=datasource))
        missing = sorted(set(datasource) - {ds.slug for ds in found})
        if missing:
            raise CommandError(f"No datasource with slug: {', '.join(missing)}.")
        api_key, key = create_api_key(name, datasources=found)
        self.stderr.write(
            f"Created API key {api_key.name!r}"
            + (f" for {', '.join(sorted(datasource))}" if datasource else " for all datasources")
            + ". Store it now; it cannot be shown again:"
        )
        self.stdout.write(key)
