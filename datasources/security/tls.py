"""Mutual TLS (RFC 8705) and private CAs: the TLS side of a datasource's calls.

A datasource may have a client certificate and key (for ``tls_client_auth`` /
``self_signed_tls_client_auth`` client authentication and certificate-bound tokens) and a CA
bundle (PEM) trusted for its servers in addition to the system's. Its calls then go through an
``ssl.SSLContext`` made for it: the server certificate is always verified (``CERT_REQUIRED``,
host name checked; there is no switch to turn that off), the client certificate is offered when
the server asks for one.

Python's ``ssl`` module loads a client key only from a file. The key is written to a temporary
file created with mode 0600 in a private (0700) directory, and encrypted there with a random
one-time passphrase (PKCS#8, the passphrase only in memory), loaded into the context, and the
file is removed at once; the plain key is never on disk. Contexts are cached per process by a
fingerprint of the certificate, key and CA text (so a replaced certificate is a new context), and
each context has its own connection pools (:func:`pool_manager` for urllib3; the fast lane's
client keys its pools by the context too): connections made with one datasource's client
certificate are never used for another's calls. The fast lane takes a built context from
:func:`built_context` on its event loop and has :func:`context_for` build one in a thread.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import os
import secrets
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import requests
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from django.views.decorators.debug import sensitive_variables

if TYPE_CHECKING:
    from ..models import Datasource


class TLSConfigError(ValueError):
    """A certificate, key or CA bundle that cannot be used; the message says which and why
    (never the key)."""


# --- checking what the builder pasted ---------------------------------------------------------


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    issuer: str
    not_after: datetime
    self_signed: bool
    #: RFC 8705 §3.1 ``x5t#S256``: base64url SHA-256 of the DER certificate (what bound
    #: tokens carry in ``cnf``).
    thumbprint: str


def certificate_info(pem: str) -> CertificateInfo:
    """The first certificate of a PEM chain, described; TLSConfigError if there is none."""
    certs = _load_certs(pem, "client certificate")
    cert = certs[0]
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_after=cert.not_valid_after_utc,
        self_signed=cert.subject == cert.issuer,
        thumbprint=base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode(),
    )


@sensitive_variables()
def check_client_pair(certificate_pem: str, key_pem: str, *, now: datetime | None = None) -> None:
    """TLSConfigError unless ``key_pem`` is the private key of the (first) certificate in
    ``certificate_pem`` and the certificate is valid now."""
    cert = _load_certs(certificate_pem, "client certificate")[0]
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        raise TLSConfigError(
            "The client private key is not an unencrypted PEM private key."
        ) from None
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise TLSConfigError("The client private key must be an RSA, EC or Ed25519 key.")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, public):
        raise TLSConfigError(
            "The client private key does not belong to the client certificate "
            f"({cert.subject.rfc4514_string()})."
        )
    now = now or datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        raise TLSConfigError(
            f"The client certificate ({cert.subject.rfc4514_string()}) expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d}."
        )
    if cert.not_valid_before_utc > now:
        raise TLSConfigError(
            f"The client certificate ({cert.subject.rfc4514_string()}) is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d}."
        )


def check_ca_bundle(pem: str) -> int:
    """The number of certificates in a CA bundle; TLSConfigError if it has none or garbage."""
    certs = _load_certs(pem, "CA bundle")
    try:
        ssl.create_default_context(cadata=pem)
    except ssl.SSLError as err:
        raise TLSConfigError(f"The CA bundle is not usable: {err.reason or err}.") from None
    return len(certs)


def _load_certs(pem: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise TLSConfigError(f"The {what} is not PEM (-----BEGIN CERTIFICATE-----).") from None
    if not certs:
        raise TLSConfigError(f"The {what} has no certificate.")
    return certs


# --- contexts and pools -----------------------------------------------------------------------


def wants_context(datasource: Datasource, *, api: bool) -> bool:
    """Whether the datasource's calls need their own TLS context: a CA bundle, or a client
    certificate (always for the authorization server; for the API only when tokens are bound
    to it)."""
    if datasource.tls_ca_bundle:
        return True
    if not (datasource.tls_client_certificate and datasource.tls_client_key):
        return False
    return datasource.certificate_bound_tokens if api else True


def _configuration(datasource: Datasource, *, api: bool) -> tuple[str, str, str] | None:
    """(client certificate, key, CA bundle) of the datasource's own context for its API
    (``api=True``) or its authorization server, or None for the default: the one place that
    says what goes into a datasource's context, for urllib3's pools and the fast lane alike."""
    if not wants_context(datasource, api=api):
        return None
    present = datasource.certificate_bound_tokens if api else True
    return (
        datasource.tls_client_certificate if present else "",
        datasource.tls_client_key if present else "",
        datasource.tls_ca_bundle or "",
    )


def context_for(datasource: Datasource, *, api: bool) -> ssl.SSLContext | None:
    """The datasource's SSLContext for calls to its API (``api=True``) or its authorization
    server, or None for the default (system CAs, no client certificate)."""
    configuration = _configuration(datasource, api=api)
    return None if configuration is None else ssl_context(*configuration)


def built_context(datasource: Datasource, *, api: bool) -> ssl.SSLContext | None:
    """The datasource's context when it has been built already (no file, no PEM parsing: an
    event loop may ask), else None: then :func:`context_for`, in a thread, builds it or raises
    its remembered failure. None also when the datasource has no context of its own
    (:func:`wants_context` says which)."""
    configuration = _configuration(datasource, api=api)
    if configuration is None:
        return None
    fingerprint = _fingerprint(*configuration)
    with _lock:
        context = _contexts.get(fingerprint)
        if context is not None:
            _contexts.move_to_end(fingerprint)
        return context


#: How many TLS configurations a process keeps built (contexts, their pools, failures).
CACHED_CONFIGURATIONS = 128


@sensitive_variables()
def ssl_context(certificate_pem: str, key_pem: str, ca_pem: str) -> ssl.SSLContext:
    """A verifying client context: system CAs plus ``ca_pem``, and the client certificate and
    key when given. Built once per process per (certificate, key, CA) text; a configuration
    that cannot be built fails the same way every time, so its failure is remembered too and
    a broken datasource does not write and load a key file on every call."""
    fingerprint = _fingerprint(certificate_pem, key_pem, ca_pem)
    with _lock:
        context = _contexts.get(fingerprint)
        if context is not None:
            _contexts.move_to_end(fingerprint)
            return context
        failed = _failures.get(fingerprint)
    if failed:
        raise TLSConfigError(failed)
    try:
        built = _build_context(certificate_pem, key_pem, ca_pem)
    except TLSConfigError as err:
        _remember(_failures, fingerprint, str(err))
        raise
    # Two threads may have built it at once: the first one stored is the one everybody uses
    # (one context, one set of pools).
    return _remember(_contexts, fingerprint, built)


_T = TypeVar("_T")


def _remember(memory: collections.OrderedDict[str, _T], fingerprint: str, value: _T) -> _T:
    """Store ``value`` unless one is there already (returned instead); the least recently
    used beyond CACHED_CONFIGURATIONS are forgotten."""
    with _lock:
        value = memory.setdefault(fingerprint, value)
        memory.move_to_end(fingerprint)
        while len(memory) > CACHED_CONFIGURATIONS:
            memory.popitem(last=False)
    return value


#: Built contexts and remembered failures by the fingerprint of their (certificate, key, CA)
#: text, least recently used first: the key text itself is not kept as a key.
_contexts: collections.OrderedDict[str, ssl.SSLContext] = collections.OrderedDict()
_failures: collections.OrderedDict[str, str] = collections.OrderedDict()


def _fingerprint(*parts: str) -> str:
    """A key for the memories that does not keep the key text itself."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


@sensitive_variables()
def _build_context(certificate_pem: str, key_pem: str, ca_pem: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context verifies already; stated, because nothing may turn it off.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    # HTTP/1.1 only, as urllib3 offers (it sets this on every connection; the fast lane's
    # client does not, and speaks no h2).
    context.set_alpn_protocols(["http/1.1"])
    if ca_pem:
        try:
            context.load_verify_locations(cadata=ca_pem)
        except ssl.SSLError as err:
            raise TLSConfigError(f"The CA bundle is not usable: {err.reason or err}.") from None
    if certificate_pem and key_pem:
        _load_client_pair(context, certificate_pem, key_pem)
    return context


@sensitive_variables()
def _load_client_pair(context: ssl.SSLContext, certificate_pem: str, key_pem: str) -> None:
    """Load the pair into ``context`` through a 0600 file in a 0700 directory, the key in it
    encrypted with a one-time passphrase; the directory is removed before returning."""
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        raise TLSConfigError(
            "The client private key is not an unencrypted PEM private key."
        ) from None
    passphrase = secrets.token_bytes(32)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    directory = tempfile.mkdtemp(prefix="datasources-tls-")  # mode 0700
    try:
        path = os.path.join(directory, "client.pem")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(certificate_pem.encode().strip() + b"\n" + encrypted)
        try:
            context.load_cert_chain(path, password=passphrase)
        except ssl.SSLError as err:
            raise TLSConfigError(
                f"The client certificate and key could not be loaded: {err.reason or err}."
            ) from None
    finally:
        shutil.rmtree(directory, ignore_errors=True)


#: id(context) -> its pools, least recently used first. An entry holds its context (through
#: the manager), so an id is not reused while its entry exists; beyond CACHED_CONFIGURATIONS
#: the least recently used pools are closed, so a process that sees many certificates over its
#: life does not keep a pool set for each.
_pools: collections.OrderedDict[int, urllib3.PoolManager] = collections.OrderedDict()
#: Guards _pools, _contexts and _failures (held for dictionary work only, never while building).
_lock = threading.Lock()


def pool_manager(context: ssl.SSLContext, *, maxsize: int) -> urllib3.PoolManager:
    """Keep-alive pools that connect with ``context`` (one PoolManager per context: a client
    certificate's connections are kept apart from every other datasource's)."""
    key = id(context)
    with _lock:
        manager = _pools.get(key)
        if manager is not None:
            _pools.move_to_end(key)
            return manager
        manager = urllib3.PoolManager(
            num_pools=16,
            maxsize=maxsize,
            retries=False,
            block=False,
            ssl_context=context,
            cert_reqs="CERT_REQUIRED",
        )
        _pools[key] = manager
        while len(_pools) > CACHED_CONFIGURATIONS:
            _, evicted = _pools.popitem(last=False)
            evicted.clear()  # closes its idle connections; ones in use close when released
    return manager


class ContextAdapterMixin:
    """For requests adapters: connect with the given SSLContext (its trust store and client
    certificate), verification required, without requests adding its own CA file to it."""

    def __init__(self, context: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        self._ssl_context = context
        super().__init__(*args, **kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would set conn.ca_certs to certifi's bundle, which urllib3 then loads into
        # the shared context on every connection; the context already trusts what it should.
        if url.lower().startswith("https"):
            conn.cert_reqs = "CERT_REQUIRED"
            conn.ca_certs = None
            conn.ca_cert_dir = None


class ContextAdapter(ContextAdapterMixin, requests.adapters.HTTPAdapter):
    pass


def failure_reason(err: BaseException) -> str | None:
    """A plain reason when ``err`` (from requests or urllib3) is a TLS failure, else None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TLSConfigError):
            # Its message is the reason; the ssl error it was made from (its __context__ when
            # just built, absent when remembered) must not make the first call's answer differ.
            return str(current).rstrip(".")
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"the server's certificate is not trusted ({current.verify_message})"
        if isinstance(current, ssl.SSLError):
            return f"TLS failed ({current.reason or type(current).__name__})"
        nested = getattr(current, "reason", None)
        if isinstance(nested, BaseException):
            current = nested
            continue
        if current.args and isinstance(current.args[0], BaseException):
            current = current.args[0]
            continue
        current = current.__cause__ or current.__context__
    return None
