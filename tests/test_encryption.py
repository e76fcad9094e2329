"""Secrets are ciphertext at rest, a wrong key raises, and keys rotate."""

import io

import pytest
from cryptography.fernet import InvalidToken
from django.core.management import call_command
from django.db import connection

from datasources.models import Datasource, Token

from .conftest import SECRET, make_datasource

pytestmark = pytest.mark.django_db

KEY_A = "tZ7s0hU3Dj1sH9bq9lq0mY3e3yqg2v3o6pQk2yq6X0E="
KEY_B = "6h2Ku0m6mJ7m0bXJ8oP1gqv1Ss0v2eQm0kJwQj0bZ3A="
KEY_NEW = "n3w-key-for-rotation-tests-0123456789abcdef"


def raw_column(table: str, column: str, pk: int) -> bytes:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table} WHERE id = %s", [pk])
        value = cursor.fetchone()[0]
    return bytes(value)


def store_tokens(datasource: Datasource, access: str, refresh: str) -> Token:
    Token.objects.filter(datasource=datasource).update(access_token=access, refresh_token=refresh)
    return Token.objects.get(datasource=datasource)


def test_columns_hold_ciphertext_only():
    datasource = make_datasource()
    token = store_tokens(datasource, "access-" + "a" * 20, "refresh-" + "r" * 20)
    secret_raw = raw_column("datasources_datasource", "client_secret", datasource.pk)
    access_raw = raw_column("datasources_token", "access_token", token.pk)
    refresh_raw = raw_column("datasources_token", "refresh_token", token.pk)
    for raw, plain in ((secret_raw, SECRET), (access_raw, "access-"), (refresh_raw, "refresh-")):
        assert plain.encode() not in raw
        assert raw.startswith(b"gAAAAA")  # Fernet token, version byte 0x80
    assert Datasource.objects.get(pk=datasource.pk).client_secret == SECRET


def test_wrong_key_raises_instead_of_returning_garbage(settings):
    datasource = make_datasource()
    settings.FERNET_KEYS = [KEY_NEW]
    with pytest.raises(InvalidToken):
        Datasource.objects.get(pk=datasource.pk)


def test_old_key_still_decrypts_and_resave_uses_the_new_one(settings):
    datasource = make_datasource()
    old_raw = raw_column("datasources_datasource", "client_secret", datasource.pk)
    settings.FERNET_KEYS = [KEY_NEW, KEY_A, KEY_B]
    loaded = Datasource.objects.get(pk=datasource.pk)
    assert loaded.client_secret == SECRET
    loaded.save()
    new_raw = raw_column("datasources_datasource", "client_secret", datasource.pk)
    assert new_raw != old_raw
    settings.FERNET_KEYS = [KEY_NEW]  # only the new key: still readable
    assert Datasource.objects.get(pk=datasource.pk).client_secret == SECRET


def test_rotate_encryption_keys_command_reencrypts_every_secret(settings):
    datasource = make_datasource()
    store_tokens(datasource, "access-token-value", "refresh-token-value")
    settings.FERNET_KEYS = [KEY_NEW, KEY_A, KEY_B]
    call_command("rotate_encryption_keys", stdout=io.StringIO())
    settings.FERNET_KEYS = [KEY_NEW]  # old keys removed after rotation
    token = Token.objects.select_related("datasource").get(datasource=datasource)
    assert token.datasource.client_secret == SECRET
    assert token.access_token == "access-token-value"
    assert token.refresh_token == "refresh-token-value"


def test_rotate_with_missing_key_fails_clearly(settings):
    make_datasource()
    settings.FERNET_KEYS = [KEY_NEW]
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="cannot be decrypted"):
        call_command("rotate_encryption_keys")


def test_repr_and_str_never_show_secrets():
    datasource = make_datasource()
    token = store_tokens(datasource, "access-token-value", "refresh-token-value")
    for text in (str(datasource), repr(datasource), str(token), repr(token)):
        assert SECRET not in text
        assert "access-token-value" not in text
        assert "refresh-token-value" not in text


def test_encrypted_fields_refuse_lookups():
    from django.core.exceptions import FieldError

    with pytest.raises(FieldError):
        list(Datasource.objects.filter(client_secret=SECRET))
