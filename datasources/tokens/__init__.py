"""Getting a valid access token: the one service behind the proxy, the tasks, the admin and app
code.

* :mod:`.decide` — one pure function: what to do with a token now (the rules, table-tested);
* :mod:`.service` — carrying decisions out: single-flight refresh, waiting, raising;
* :mod:`.lease` — one refresh at a time per token, across processes and machines;
* :mod:`.failures` — what an error means (dead grant, configuration, transient), backoff, record;
* :mod:`.expiry` — when a new token expires, from whatever the provider sent;
* :mod:`.lifecycle` — storing, disconnecting and resetting tokens; which rows are due.

May import the authorization-server client (:mod:`datasources.authserver`), models and the
bottom modules (conf, exceptions, signals, tracing); never calls, proxy, admin or views.
"""

from .failures import backoff_seconds, classify, record_event
from .lifecycle import (
    claim_due,
    disconnect,
    disconnect_end_user,
    due_token_ids,
    end_user_token,
    load_token,
    prune_history,
    replace_now,
    reset_after_reconfiguration,
    store_authorization,
    token_owner,
)
from .service import (
    RefreshResult,
    get_access_token,
    get_valid_token,
    refresh_after_rejection,
    refresh_token,
    refresh_token_by_id,
    usable_as_is,
)

__all__ = [
    "RefreshResult",
    "backoff_seconds",
    "claim_due",
    "classify",
    "disconnect",
    "disconnect_end_user",
    "due_token_ids",
    "end_user_token",
    "get_access_token",
    "get_valid_token",
    "load_token",
    "prune_history",
    "record_event",
    "refresh_after_rejection",
    "refresh_token",
    "refresh_token_by_id",
    "replace_now",
    "reset_after_reconfiguration",
    "store_authorization",
    "token_owner",
    "usable_as_is",
]
