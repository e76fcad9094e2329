"""What the JSON API reads and writes. No schema here has a field for a secret except
:class:`AccessTokenOut`, which only the ``token`` permission reaches."""

from __future__ import annotations

from datetime import datetime

from ninja import Schema
from pydantic import ConfigDict, Field


class ErrorOut(Schema):
    """Every error answer (extra fields depend on the error, e.g. ``permission``)."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="A stable code: unauthorized, forbidden, not_found, …")
    detail: str = Field(description="A sentence for people; never a secret.")


class TokenStateOut(Schema):
    """The state of a datasource's shared token (no token value)."""

    status: str = Field(description="not_authorized, active or needs_reauthorization")
    expires_at: datetime | None
    last_refreshed_at: datetime | None
    refresh_count: int
    last_error: str = Field(description="The last refresh failure, without secrets; empty if none")
    scope: str


class UpstreamOut(Schema):
    """What the proxy knows of the upstream API's health (rate limit, circuit breaker)."""

    state: str = Field(description="pass, probe, rate_limited or circuit_open")
    consecutive_failures: int


class DatasourceOut(Schema):
    slug: str
    name: str
    grant_type: str
    base_url: str
    per_user: bool = Field(description="Each user has their own token (no shared token).")
    token: TokenStateOut | None = Field(
        description="The shared token's state; null for datasources with per-user tokens."
    )
    upstream: UpstreamOut


class DatasourceListOut(Schema):
    items: list[DatasourceOut]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null on the last page."
    )


class AccessTokenOut(Schema):
    """A usable access token (refreshed first when due). Never the refresh token."""

    access_token: str
    token_type: str
    expires_at: datetime | None


class ConnectSessionIn(Schema):
    datasource: str = Field(description="The datasource's slug (an authorization-code one).")
    end_user: str = Field(
        description="Your id for the end user: 1 to 255 printable characters, no space at either "
        "end; the proxy's X-Datasource-End-User header names them later."
    )
    return_url: str = Field(
        description="Where the person goes back to when done: must match one of the "
        "datasource's allowed return URLs (an origin or a URL prefix)."
    )
    display_name: str = Field("", description="Shown on the connect page instead of the id.")


class ConnectSessionOut(Schema):
    session: str = Field(description="The session's id; the return URL gets it back.")
    connect_url: str = Field(description="Send the end user here. It works once.")
    expires_at: datetime


class TokenIn(Schema):
    """The optional body of ``POST …/token``."""

    model_config = ConfigDict(extra="forbid")

    end_user: str | None = Field(
        None,
        description=(
            "An end user's id (1 to 255 printable characters, no space at either end): their "
            "token, never the shared one instead (409 not_connected when they have none)."
        ),
    )


class ConnectionOut(Schema):
    """An end user's connection to a datasource: their token's state, never a token value."""

    end_user: str = Field(description="The id your application chose for the end user.")
    status: str = Field(description="not_authorized, active or needs_reauthorization")
    expires_at: datetime | None
    last_refreshed_at: datetime | None
    last_error: str = Field(description="The last refresh failure, without secrets; empty if none")
    connected_at: datetime | None = Field(description="When the current token was obtained.")
    identity: str = Field(
        description="The upstream account the connection signed in (a reconnect must sign in "
        "the same one); empty when the datasource has no way to tell. Not a secret."
    )


class ConnectionListOut(Schema):
    items: list[ConnectionOut]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null on the last page."
    )
