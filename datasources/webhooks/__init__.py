"""Webhooks: signed JSON events (Standard Webhooks) sent to configured URLs.

``signing`` (secrets and signatures), ``events`` (what is sent, and when: the signal
receivers), ``delivery`` (sending one attempt, retries, the sweep). See docs/webhooks.md.
"""
