from cryptography.fernet import InvalidToken
from django.core.management.base import BaseCommand, CommandError

from datasources.encryption import rotate_all


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored secret with the first key in FERNET_KEYS. Put the new key first, "
        "keep the old ones after it, run this, then remove the old keys."
    )

    def handle(self, *args, **options):
        try:
            counts = rotate_all()
        except InvalidToken:
            raise CommandError(
                "A stored secret cannot be decrypted with any key in FERNET_KEYS; nothing more was "
                "changed. Add the key it was encrypted with to FERNET_KEYS and run this again."
            ) from None
        for label, count in counts.items():
            self.stdout.write(f"{label}: {count} row(s) re-encrypted")
        self.stdout.write(self.style.SUCCESS("All secrets are encrypted with the first key."))
