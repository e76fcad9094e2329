"""Webhooks: signed JSON events (Standard Webhooks) sent to configured URLs.

``signing`` (secrets and signatures), ``events`` (what is sent, and when: the signal
receivers), ``delivery`` (sending one attempt, retries, the sweep), ``endpoints`` (secrets,
rotation, the test event). See docs/webhooks.md.

May import tokens, the authorization-server client's bounded outbound session, models and the
bottom modules; it hands deliveries to Celery through :mod:`datasources.tasks` (imported when
a delivery is enqueued), the one arrow up, named in the import-linter contract.
"""
