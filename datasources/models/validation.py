"""The rules a datasource's settings follow together, as functions ``Datasource.clean()`` runs.

Each rule reads a datasource and returns an :class:`Outcome`: the problems it found, by field,
and the values it normalised (e.g. ``"503, 429"`` → ``"429,503"``). None of them writes: the
model applies what they return, so a rule can be tested on an unsaved instance and read on its
own. A rule for a new setting goes here, beside the others, with its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.utils.translation import gettext_lazy as _

from . import bodyrules
from .choices import MTLS_METHODS, GrantType, TokenPlacement, TokenSharing
from .values import (
    DEFAULT_ALLOWED_METHODS,
    HEADER_NAME,
    HEADER_VALUE,
    RESERVED_AUTH_PARAMS,
    RESERVED_DEFAULT_HEADERS,
    RETRYABLE_STATUSES,
    normalize_scopes,
    parse_methods,
    parse_return_urls,
    parse_status_codes,
    validate_issuer,
)

if TYPE_CHECKING:
    from .datasource import Datasource


@dataclass
class Outcome:
    """What a rule found: problems by field (shown next to the field) and normalised values."""

    problems: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


def _is_string_object(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def grant_rules(ds: Datasource) -> Outcome:
    """What the authorization code grant needs: an authorization URL, and a PAR endpoint when
    the server requires pushed requests."""
    out = Outcome()
    code_grant = ds.grant_type == GrantType.AUTHORIZATION_CODE
    if code_grant and not ds.authorization_url:
        out.problems["authorization_url"] = _(
            "The authorization code grant needs an authorization URL."
        )
    if (
        code_grant
        and ds.require_pushed_authorization_requests
        and not ds.pushed_authorization_request_url
    ):
        out.problems["pushed_authorization_request_url"] = _(
            "The server requires pushed authorization requests: enter its PAR endpoint "
            "(or fill the endpoints from the issuer's metadata)."
        )
    return out


def token_sharing_rules(ds: Datasource) -> Outcome:
    """Per-user tokens only where a user signs in."""
    if ds.token_sharing == TokenSharing.PER_USER and ds.grant_type != GrantType.AUTHORIZATION_CODE:
        return Outcome(
            problems={
                "token_sharing": _(
                    "Per-user tokens need the authorization code grant: with client "
                    "credentials or a JWT bearer grant there is no user."
                )
            }
        )
    return Outcome()


def custom_auth_params_rules(ds: Datasource) -> Outcome:
    """A JSON object of strings that does not override what the flow itself sends."""
    params = ds.custom_auth_params
    if params in (None, ""):
        return Outcome(values={"custom_auth_params": {}})
    if not _is_string_object(params):
        return Outcome(
            problems={
                "custom_auth_params": _(
                    'Enter a JSON object whose values are strings, e.g. {"prompt": "consent"}.'
                )
            }
        )
    if reserved := sorted(RESERVED_AUTH_PARAMS.intersection(params)):
        return Outcome(
            problems={
                "custom_auth_params": _(
                    "These parameters are set by the flow itself and cannot be overridden: "
                    "%(names)s."
                )
                % {"names": ", ".join(reserved)}
            }
        )
    return Outcome()


def placement_rules(ds: Datasource) -> Outcome:
    """DPoP needs the header; a query placement gets a parameter name."""
    out = Outcome()
    if ds.use_dpop and ds.token_placement == TokenPlacement.QUERY:
        out.problems["token_placement"] = _(
            "DPoP sends the token in the Authorization header (RFC 9449 §7.1): choose "
            "“Request header”, or turn DPoP off."
        )
    if ds.token_placement == TokenPlacement.QUERY and not ds.query_param_name:
        out.values["query_param_name"] = "access_token"
    return out


def tls_rules(ds: Datasource) -> Outcome:
    """Mutual TLS: a matching certificate and key wherever one is needed, an https token URL,
    a CA bundle that parses (stored with LF line ends)."""
    from ..security import tls

    out = Outcome()
    problems = out.problems
    has_pair = bool(ds.tls_client_certificate and ds.tls_client_key)
    if ds.tls_client_certificate or ds.tls_client_key:
        if not has_pair:
            problems["tls_client_certificate"] = _(
                "Mutual TLS needs both the client certificate and its private key."
            )
        else:
            try:
                tls.check_client_pair(ds.tls_client_certificate, ds.tls_client_key)
            except tls.TLSConfigError as err:
                problems["tls_client_certificate"] = str(err)
    mtls = ds.client_authentication in MTLS_METHODS
    if mtls and not has_pair:
        problems["client_authentication"] = _(
            "Mutual TLS client authentication needs a client certificate and key."
        )
    if mtls and not ds.access_token_url.startswith("https://"):
        problems["access_token_url"] = _("Mutual TLS needs an https:// access token URL.")
    if ds.certificate_bound_tokens and not has_pair:
        problems["certificate_bound_tokens"] = _(
            "Certificate-bound tokens need a client certificate and key."
        )
    if ds.tls_ca_bundle:
        bundle = ds.tls_ca_bundle.replace("\r\n", "\n").strip() + "\n"
        out.values["tls_ca_bundle"] = bundle
        try:
            tls.check_ca_bundle(bundle)
        except tls.TLSConfigError as err:
            problems["tls_ca_bundle"] = str(err)
    return out


def issuer_rules(ds: Datasource) -> Outcome:
    problem = validate_issuer(ds.issuer) if ds.issuer else None
    return Outcome(problems={"issuer": problem} if problem else {})


def _retryable(value: str) -> frozenset[int]:
    codes = parse_status_codes(value)
    if codes - RETRYABLE_STATUSES:
        raise ValueError(
            f"Only {', '.join(map(str, sorted(RETRYABLE_STATUSES)))} can be retried "
            f"(not {', '.join(map(str, sorted(codes - RETRYABLE_STATUSES)))}): a 401 "
            "gets one refresh-and-retry, other errors are answers."
        )
    return codes


def _listed(name: str, parse: Callable[[str], frozenset], join: Callable) -> Callable:
    """A rule for a comma-separated list setting: parsed, then stored sorted and joined."""

    def rule(ds: Datasource) -> Outcome:
        try:
            parsed = parse(getattr(ds, name))
        except ValueError as err:
            return Outcome(problems={name: str(err)})
        return Outcome(values={name: join(parsed)})

    rule.__name__ = f"{name}_rules"
    rule.__doc__ = f"``{name}``: parsed, stored sorted and comma-separated."
    return rule


def _codes(codes: frozenset[int]) -> str:
    return ",".join(str(code) for code in sorted(codes))


expiry_status_rules = _listed("expiry_status_codes", parse_status_codes, _codes)
retry_status_rules = _listed("retry_statuses", _retryable, _codes)
allowed_method_rules = _listed(
    "allowed_methods",
    parse_methods,
    lambda methods: ",".join(sorted(methods)) or DEFAULT_ALLOWED_METHODS,
)


def expiry_body_rules_rules(ds: Datasource) -> Outcome:
    """``expiry_body_rules``: a list of well-formed body conditions (:mod:`.bodyrules`), the
    same check for the admin form and import; stored as ``[]`` when empty."""
    found = bodyrules.problem(ds.expiry_body_rules)
    if found:
        return Outcome(problems={"expiry_body_rules": found})
    return Outcome(values={"expiry_body_rules": bodyrules.normalized(ds.expiry_body_rules)})


def return_url_rules(ds: Datasource) -> Outcome:
    """``allowed_return_urls``: one origin or URL prefix per line, stored one per line."""
    try:
        entries = parse_return_urls(ds.allowed_return_urls)
    except ValueError as err:
        return Outcome(problems={"allowed_return_urls": str(err)})
    return Outcome(values={"allowed_return_urls": "\n".join(entries)})


def _header_problem(name: str, value: str) -> str | None:
    if not HEADER_NAME.match(name):
        return _("%(name)r is not a valid header name.") % {"name": name}
    if name.lower() in RESERVED_DEFAULT_HEADERS or name.lower().startswith("x-forwarded-"):
        return _(
            "%(name)s cannot be set here: it carries credentials or is set by the proxy itself."
        ) % {"name": name}
    if not HEADER_VALUE.match(value):
        return _("The value of %(name)s has control or non-Latin-1 characters, or is too long.") % {
            "name": name
        }
    return None


def _query_param_problem(ds: Datasource, name: str, value: str) -> str | None:
    if not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name + value):
        return _(
            "Parameter names must be non-empty and names and values free of control characters."
        )
    token_param = ds.query_param_name or "access_token"
    if ds.token_placement == TokenPlacement.QUERY and name == token_param:
        return _("%(name)s carries the access token and cannot be set here.") % {"name": name}
    return None


def default_rules(ds: Datasource) -> Outcome:
    """Default headers and query parameters: objects of strings that cannot carry or replace
    credentials (the last problem found is the one shown, as it always was)."""
    out = Outcome()
    checks = {
        "default_headers": _header_problem,
        "default_query_params": lambda name, value: _query_param_problem(ds, name, value),
    }
    for field_name, check in checks.items():
        value = getattr(ds, field_name)
        if value in (None, ""):
            out.values[field_name] = {}
            continue
        if not _is_string_object(value):
            out.problems[field_name] = _(
                'Enter a JSON object whose values are strings, e.g. {"a": "b"}.'
            )
            continue
        for name, item in value.items():
            problem = check(name, item)
            if problem:
                out.problems[field_name] = problem
    return out


def scope_rules(ds: Datasource) -> Outcome:
    return Outcome(values={"scopes": normalize_scopes(ds.scopes)})


#: The rules ``Datasource.clean()`` runs, in the order their problems are reported.
RULES: tuple[Callable[[Datasource], Outcome], ...] = (
    grant_rules,
    custom_auth_params_rules,
    token_sharing_rules,
    placement_rules,
    tls_rules,
    issuer_rules,
    expiry_status_rules,
    expiry_body_rules_rules,
    return_url_rules,
    retry_status_rules,
    allowed_method_rules,
    default_rules,
    scope_rules,
)


def check(ds: Datasource) -> Outcome:
    """Every rule's problems and normalised values, merged (rules name disjoint fields)."""
    merged = Outcome()
    for rule in RULES:
        found = rule(ds)
        merged.problems.update(found.problems)
        merged.values.update(found.values)
    return merged
