from collections import Counter

from django.core.management.base import BaseCommand

from datasources import tokens
from datasources.models import Token


class Command(BaseCommand):
    help = "Run one refresh sweep synchronously (for cron instead of Celery beat)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--limit",
            type=int,
            default=None,
            help="At most this many tokens (default: batch size).",
        )

    def handle(self, *args, limit=None, **options):
        ids = tokens.due_token_ids(limit)
        total = len(ids)
        outcomes: Counter[str] = Counter()
        for number, token in enumerate(
            Token.objects.select_related("datasource").filter(pk__in=ids), start=1
        ):
            result = tokens.refresh_token(token)
            outcomes[result.outcome] += 1
            self.stdout.write(
                f"[{number}/{total}] {token.datasource.slug}: {result.outcome}"
                + (f" ({result.error})" if result.error and result.outcome != "refreshed" else "")
            )
        tokens.prune_history()
        self.stdout.write(
            self.style.SUCCESS(
                f"Swept {total} token(s): {outcomes['refreshed']} refreshed, "
                f"{outcomes['transient']} failed transiently, "
                f"{outcomes['configuration']} failed on a configuration error, "
                f"{outcomes['reauthorization']} need re-authorization, "
                f"{outcomes['fresh'] + outcomes['skipped']} skipped."
            )
        )
