"""Signals other code can listen to. Receivers get no secret values.

datasource_authorized(sender=Datasource, datasource, user, token, recovered)
    The authorization-code flow stored a new token. ``recovered``: the token was failing
    before (``Token.is_failing``: needed re-authorization, or refreshes had failed since the
    last success).
token_refreshed(sender=Datasource, datasource, token, recovered)
    A refresh (or a new client-credentials grant) succeeded; ``recovered`` as above.
token_refresh_failed(sender=Datasource, datasource, token, error, transient)
    A refresh failed; ``transient`` says whether it will be retried.
reauthorization_required(sender=Datasource, datasource, token, error)
    A refresh failed for good; someone must re-authorize in the admin.
identity_mismatch(sender=Datasource, datasource, token, identity)
    A reconnect (an end user's connect link, a per-user token) signed in another upstream
    account than the stored token's (``identity``: the one that signed in); nothing replaced.

They are sent inside the transaction that writes the token change (a transactional outbox: the
webhook deliveries a receiver writes commit with it, or not at all). Hand slow or outside work
to ``transaction.on_commit``. A receiver that raises is logged (by type) and undoes nothing:
the other receivers run and the token change commits.
"""

from django.dispatch import Signal

datasource_authorized = Signal()
token_refreshed = Signal()
token_refresh_failed = Signal()
reauthorization_required = Signal()
identity_mismatch = Signal()
