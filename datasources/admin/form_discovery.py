"""The datasource form's discovery box: the endpoints and capabilities read from the issuer's
published metadata (OpenID Connect discovery, RFC 8414) fill the form before it is checked, and
what the metadata contradicts is said next to the field."""

from __future__ import annotations

from django.utils.translation import gettext_lazy as _

from ..authserver import oauth
from ..exceptions import DatasourceError
from ..models import MTLS_METHODS
from ..security import dpop, tls

#: Our client authentication choices as the server's metadata names them.
METADATA_AUTH_METHODS = {
    "basic": "client_secret_basic",
    "body": "client_secret_post",
    "private_key_jwt": "private_key_jwt",
    "client_secret_jwt": "client_secret_jwt",
    "tls_client_auth": "tls_client_auth",
    "self_signed_tls_client_auth": "self_signed_tls_client_auth",
}


class Discovery:
    """Mixin of DatasourceForm (see the module docstring)."""

    def _discover(self, cleaned: dict) -> None:
        issuer = cleaned.get("issuer")
        if not issuer:
            self.add_error("issuer", _("Enter the issuer URL to discover its endpoints."))
            return
        try:
            metadata = oauth.discover(issuer, ca_bundle=cleaned.get("tls_ca_bundle") or "")
        except (DatasourceError, tls.TLSConfigError) as err:
            self.add_error("issuer", str(err))
            return
        cleaned["access_token_url"] = metadata.token_endpoint
        if metadata.authorization_endpoint:
            cleaned["authorization_url"] = metadata.authorization_endpoint
        if metadata.revocation_endpoint:
            cleaned["revocation_url"] = metadata.revocation_endpoint
        cleaned["use_pkce"] = metadata.pkce_s256
        cleaned["issuer_returns_iss"] = metadata.returns_iss
        cleaned["pushed_authorization_request_url"] = metadata.pushed_authorization_request_endpoint
        self._use_mtls_aliases(cleaned, metadata)
        algs = metadata.dpop_signing_alg_values_supported
        if cleaned.get("use_dpop") and algs and dpop.DEFAULT_ALG not in algs:
            self.add_error(
                "use_dpop",
                _(
                    "The server's DPoP algorithms (%(algs)s) do not include %(ours)s, which "
                    "the generated DPoP key uses."
                )
                % {"algs": ", ".join(algs), "ours": dpop.DEFAULT_ALG},
            )
        cleaned["require_pushed_authorization_requests"] = (
            metadata.require_pushed_authorization_requests
        )
        self.instance.token_endpoint_auth_methods_supported = " ".join(
            metadata.token_endpoint_auth_methods_supported
        )[:500]
        supported = metadata.token_endpoint_auth_methods_supported
        chosen = METADATA_AUTH_METHODS.get(cleaned.get("client_authentication") or "")
        if supported and chosen and chosen not in supported:
            self.add_error(
                "client_authentication",
                _(
                    "The server's metadata does not list %(chosen)s among its client "
                    "authentication methods (%(supported)s): choose one of those."
                )
                % {"chosen": chosen, "supported": ", ".join(supported)},
            )
        self.discovered = metadata

    def _use_mtls_aliases(self, cleaned: dict, metadata: oauth.ServerMetadata) -> None:
        """Calls made with the TLS client certificate go to the server's mTLS aliases of its
        endpoints, when it publishes them (RFC 8705 §5)."""
        mtls = cleaned.get("client_authentication") in MTLS_METHODS or cleaned.get(
            "certificate_bound_tokens"
        )
        aliases = metadata.mtls_endpoint_aliases
        if not mtls or not aliases:
            return
        for key, field in (
            ("token_endpoint", "access_token_url"),
            ("revocation_endpoint", "revocation_url"),
            ("pushed_authorization_request_endpoint", "pushed_authorization_request_url"),
        ):
            if aliases.get(key):
                cleaned[field] = aliases[key]
