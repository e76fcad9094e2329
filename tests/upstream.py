"""A small upstream API protected by django-oauth-toolkit: validates the access token for real
and echoes what it received, so tests can see exactly what crossed the proxy."""

import json

from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from oauth2_provider.oauth2_backends import get_oauthlib_core


@csrf_exempt
def echo(request, path):
    raw_body = request.body  # read first: token validation may parse the form body
    if path == "always-401":  # e.g. a wrong base path or a missing scope
        return JsonResponse({"error": "invalid_token"}, status=401)
    valid, oauth_request = get_oauthlib_core().verify_request(request, scopes=[])
    if not valid:
        return JsonResponse({"error": "invalid_token"}, status=401)
    if path.startswith("big/"):
        size = int(path.split("/")[1])
        chunk = b"x" * 65536

        def body():
            sent = 0
            while sent < size:
                part = chunk[: min(len(chunk), size - sent)]
                sent += len(part)
                yield part

        response = StreamingHttpResponse(body(), content_type="application/octet-stream")
        response["Content-Length"] = str(size)
        return response
    if path == "slow":  # answers after the proxy gave up: touch no database by then
        import time

        time.sleep(2)
        return JsonResponse({"slow": True})
    if path == "redirect":
        response = HttpResponse(status=302)
        response["Location"] = "/upstream/elsewhere"
        return response
    if path == "set-cookie":
        response = JsonResponse({"ok": True})
        response.set_cookie("upstream_session", "abc")
        return response
    token = oauth_request.access_token
    return JsonResponse(
        {
            "method": request.method,
            "path": path,
            "query": {k: v for k, v in request.GET.items() if k != "access_token"},
            "token_in_query": "access_token" in request.GET,
            "body": raw_body.decode("utf-8", "replace"),
            "content_type": request.content_type,
            "headers": {k: v for k, v in request.headers.items()},
            "cookies": dict(request.COOKIES),
            "user": token.user.username if token.user else None,
            "scope": token.scope,
            "application": token.application.client_id,
        },
        json_dumps_params={"sort_keys": True},
        encoder=json.JSONEncoder,
    )
