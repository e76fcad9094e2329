"""The TLS building blocks: checking pasted certificates and keys, the client key never on disk
in plain text, one context and pool set per certificate, verification always on."""

from __future__ import annotations

import os
import ssl
from datetime import UTC, datetime, timedelta

import pytest

from datasources.models import Datasource
from datasources.ops.config_io import ImportFailed, import_datasources
from datasources.security import tls

from . import certs


@pytest.fixture(scope="module")
def ca():
    return certs.make_ca()


def test_a_key_of_another_certificate_is_refused_naming_the_certificate(ca):
    one, other = certs.client_cert(ca, "one"), certs.client_cert(ca, "other")
    tls.check_client_pair(one.cert_pem, one.key_pem)
    with pytest.raises(tls.TLSConfigError) as caught:
        tls.check_client_pair(one.cert_pem, other.key_pem)
    assert "does not belong" in str(caught.value) and "CN=one" in str(caught.value)
    assert "PRIVATE" not in str(caught.value)


def test_expired_and_garbage_are_clear_errors(ca):
    old = certs.client_cert(ca, "old", days=1, not_before=datetime.now(UTC) - timedelta(days=10))
    with pytest.raises(tls.TLSConfigError, match="expired on"):
        tls.check_client_pair(old.cert_pem, old.key_pem)
    with pytest.raises(tls.TLSConfigError, match="not PEM"):
        tls.check_client_pair("hello", old.key_pem)
    with pytest.raises(tls.TLSConfigError, match="not an unencrypted PEM private key"):
        tls.check_client_pair(
            old.cert_pem, "-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----"
        )
    with pytest.raises(tls.TLSConfigError, match="CA bundle"):
        tls.check_ca_bundle("not a certificate")
    assert tls.check_ca_bundle(ca.cert_pem + certs.make_ca("B").cert_pem) == 2


def test_the_client_key_reaches_the_ssl_module_encrypted_in_a_private_file_removed_at_once(
    ca, monkeypatch
):
    client = certs.client_cert(ca, "disk")
    seen = {}
    real = ssl.SSLContext.load_cert_chain

    def spy(self, certfile, keyfile=None, password=None):
        seen["mode"] = os.stat(certfile).st_mode & 0o777
        seen["dir_mode"] = os.stat(os.path.dirname(certfile)).st_mode & 0o777
        seen["path"] = certfile
        with open(certfile) as handle:
            seen["text"] = handle.read()
        return real(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    context = tls.ssl_context(client.cert_pem, client.key_pem, ca.cert_pem)
    assert seen["mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert "ENCRYPTED PRIVATE KEY" in seen["text"]
    assert client.key_pem.splitlines()[1] not in seen["text"]
    assert not os.path.exists(os.path.dirname(seen["path"]))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # cached: the same context for the same text, a new one for another certificate
    assert tls.ssl_context(client.cert_pem, client.key_pem, ca.cert_pem) is context
    other = certs.client_cert(ca, "other")
    second = tls.ssl_context(other.cert_pem, other.key_pem, ca.cert_pem)
    assert second is not context
    assert tls.pool_manager(context, maxsize=2) is tls.pool_manager(context, maxsize=2)
    assert tls.pool_manager(context, maxsize=2) is not tls.pool_manager(second, maxsize=2)


def test_a_configuration_that_cannot_be_built_fails_from_memory_without_touching_disk(
    ca, monkeypatch
):
    one, other = certs.client_cert(ca, "broken-one"), certs.client_cert(ca, "broken-other")
    loads = []
    real = ssl.SSLContext.load_cert_chain

    def counted(self, *args, **kwargs):
        loads.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", counted)
    for _ in range(3):
        with pytest.raises(tls.TLSConfigError, match="could not be loaded") as caught:
            tls.ssl_context(one.cert_pem, other.key_pem, "")
        assert "PRIVATE" not in str(caught.value)
    assert len(loads) == 1
    assert all(one.key_pem not in key and other.key_pem not in key for key in tls._failures)


def test_pools_are_kept_for_the_most_recently_used_configurations_only(monkeypatch):
    monkeypatch.setattr(tls, "_pools", type(tls._pools)())
    monkeypatch.setattr(tls, "CACHED_CONFIGURATIONS", 2)
    contexts = [ssl.create_default_context() for _ in range(3)]
    first = tls.pool_manager(contexts[0], maxsize=2)
    second = tls.pool_manager(contexts[1], maxsize=2)
    second.connection_from_url("https://example.invalid/")  # a pool inside it
    assert len(second.pools) == 1
    assert tls.pool_manager(contexts[0], maxsize=2) is first  # used again: kept
    tls.pool_manager(contexts[2], maxsize=2)  # evicts the least recently used: the second
    assert list(tls._pools) == [id(contexts[0]), id(contexts[2])]
    assert len(second.pools) == 0  # closed, not just forgotten
    assert tls.pool_manager(contexts[1], maxsize=2) is not second


@pytest.mark.django_db
def test_import_refuses_a_mismatched_pair_and_mtls_without_a_certificate(ca):
    one, other = certs.client_cert(ca, "one"), certs.client_cert(ca, "other")
    entry = {
        "name": "m",
        "slug": "m",
        "base_url": "https://api.example/",
        "grant_type": "client_credentials",
        "access_token_url": "https://as.example/token",
        "client_id": "c",
        "client_authentication": "tls_client_auth",
        "certificate_bound_tokens": True,
    }
    with pytest.raises(ImportFailed) as caught:
        import_datasources([entry])
    assert "needs a client certificate and key" in str(caught.value)
    with pytest.raises(ImportFailed) as caught:
        import_datasources(
            [{**entry, "tls_client_certificate": one.cert_pem, "tls_client_key": other.key_pem}]
        )
    assert "does not belong" in str(caught.value)
    assert "PRIVATE" not in str(caught.value)
    import_datasources(
        [{**entry, "tls_client_certificate": one.cert_pem, "tls_client_key": one.key_pem}]
    )
    ds = Datasource.objects.get(slug="m")
    assert tls.context_for(ds, api=True) is tls.context_for(ds, api=False)
    ds.certificate_bound_tokens = False
    assert tls.context_for(ds, api=True) is None  # the API gets no certificate then
