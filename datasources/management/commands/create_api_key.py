from django.core.management.base import BaseCommand, CommandError

from datasources.models import PERMISSIONS, Datasource
from datasources.proxy.apikeys import create_api_key


class Command(BaseCommand):
    help = (
        "Create an API key for the proxy and print it once on its own line. Only a hash is "
        "stored: the key cannot be shown again. Say which datasources it may call "
        "(--datasource, repeatable) or --all-datasources."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="Who or what uses the key.")
        scope = parser.add_mutually_exclusive_group(required=True)
        scope.add_argument(
            "--datasource",
            action="append",
            default=[],
            metavar="SLUG",
            help="Let the key call this datasource (repeatable).",
        )
        scope.add_argument(
            "--all-datasources",
            action="store_true",
            help="Let the key call every datasource, including ones added later.",
        )

        parser.add_argument(
            "--permission",
            action="append",
            choices=list(PERMISSIONS),
            metavar="{" + ",".join(PERMISSIONS) + "}",
            help=(
                "What the key may do (repeatable): proxy (call the datasources; the default "
                "when none is given), connect (create connect links for end users), manage (the "
                "JSON API), token (read access tokens through the JSON API; every use is "
                "recorded)."
            ),
        )

    def handle(
        self,
        *args,
        name: str,
        datasource: list[str],
        all_datasources: bool,
        permission: list[str] | None,
        **options,
    ):
        found = list(Datasource.objects.filter(slug__in=datasource))
        missing = sorted(set(datasource) - {ds.slug for ds in found})
        if missing:
            raise CommandError(f"No datasource with slug: {', '.join(missing)}.")
        granted = sorted(set(permission or ["proxy"]), key=list(PERMISSIONS).index)
        api_key, key = create_api_key(
            name, datasources=None if all_datasources else found, permissions=granted
        )
        self.stderr.write(
            f"Created API key {api_key.name!r}"
            + (
                " for all datasources"
                if all_datasources
                else f" for {', '.join(sorted(datasource))}"
            )
            + f" with permission(s) {', '.join(granted)}"
            + ". Store it now; it cannot be shown again:"
        )
        self.stdout.write(key)
