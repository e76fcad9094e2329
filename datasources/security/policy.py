"""Which URLs we may talk to: https everywhere, plain http only for loopback hosts.

oauthlib refuses http:// unless OAUTHLIB_INSECURE_TRANSPORT is set process-wide. We never set it;
this module is the single policy, applied to every URL before any request leaves the process.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

from ..conf import app_settings
from ..exceptions import InsecureTransport


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def transport_problem(url: str) -> str | None:
    """Why ``url`` may not be used, or None when it may."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "is not a valid URL"
    if parts.scheme == "https" and host:
        return None
    if parts.scheme == "http" and host:
        if app_settings.ALLOW_LOOPBACK_HTTP and is_loopback_host(host):
            return None
        return "must use https:// (http:// is allowed only for loopback hosts such as 127.0.0.1)"
    return "must be an absolute https:// URL"


def check_transport(url: str) -> None:
    problem = transport_problem(url)
    if problem:
        raise InsecureTransport(f"URL {problem}.")


def validate_secure_url(value: str) -> None:
    """Model/form validator applying the transport policy."""
    if not value:
        return
    problem = transport_problem(value)
    if problem:
        raise ValidationError("This URL %(problem)s.", code="insecure", params={"problem": problem})
