import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create a superuser with a random password if none exists, and print the login. "
        "Used by `make run` so a newcomer can log in at once. Give it an email address "
        "(--email or ADMIN_EMAIL): re-authorization notices go to a datasource's owner by email."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument(
            "--email",
            default=os.environ.get("ADMIN_EMAIL", ""),
            help="Email address of the new superuser (default: $ADMIN_EMAIL).",
        )

    def handle(self, *args, username: str, email: str, **options):
        User = get_user_model()
        existing = User.objects.filter(is_superuser=True).order_by("pk").first()
        if existing is not None:
            self.stdout.write(
                "A superuser exists already; log in with it (or run manage.py changepassword)."
            )
            if not existing.email:
                self._no_email_note(existing.get_username())
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email=email, password=password)
        self.stdout.write(self.style.SUCCESS(f"Admin login: {username} / {password}"))
        if not email:
            self._no_email_note(username)

    def _no_email_note(self, username: str) -> None:
        self.stdout.write(
            self.style.WARNING(
                f"{username} has no email address, so the notice that a datasource they own "
                "needs re-authorization goes nowhere. Set one in the admin (Users), or run "
                "with ADMIN_EMAIL=you@example.com (EMAIL_URL sets how mail is sent; by "
                "default it is printed to the console)."
            )
        )
