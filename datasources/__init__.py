"""OAuth2-connected datasources for Django."""
