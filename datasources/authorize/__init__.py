"""The authorization-code flow as a person goes through it: the server-side state (start,
single-use state and PKCE, completion) and the views of the callback and the connect page.

May import tokens, authserver, models and the bottom modules; never admin or proxy.
"""
