"""Throwaway X.509 material made at test time with ``cryptography`` (no private key is
committed): a CA, server certificates (for 127.0.0.1, another address, or host names) and client
certificates, CA-issued or self-signed."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()

    @property
    def thumbprint(self) -> str:
        """x5t#S256 (RFC 8705 §3.1)."""
        der = self.cert.public_bytes(serialization.Encoding.DER)
        return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()

    @property
    def x5c(self) -> str:
        return base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()

    def write(self, directory: Path, name: str) -> tuple[str, str]:
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_text(self.cert_pem)
        key.write_text(self.key_pem)
        key.chmod(0o600)
        return str(cert), str(key)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Datasources Test"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _build(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: Issued | None,
    *,
    ca: bool = False,
    server_ip: str | None = None,
    server_names: tuple[str, ...] = (),
    client: bool = False,
    days: int = 30,
    not_before: datetime | None = None,
) -> Issued:
    now = not_before or datetime.now(UTC) - timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server_ip or server_names:
        alternative: list[x509.GeneralName] = [x509.DNSName(name) for name in server_names]
        if server_ip:
            alternative.append(x509.IPAddress(ipaddress.ip_address(server_ip)))
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternative), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    signer = issuer.key if issuer else key
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def make_ca(name: str = "Test CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    return _build(_name(name), key, None, ca=True)


def server_cert(ca: Issued, ip: str | None = "127.0.0.1", names: tuple[str, ...] = ()) -> Issued:
    """For the address ``ip`` and/or the host ``names`` (nothing else: the name a client
    checks must be among them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _build(_name(ip or names[0]), key, ca, server_ip=ip, server_names=names)


def client_cert(ca: Issued | None, common_name: str, **kwargs) -> Issued:
    """Issued by ``ca``, or self-signed when ``ca`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    return _build(_name(common_name), key, ca, client=True, **kwargs)
