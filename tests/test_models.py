import pytest
from django.core.exceptions import ValidationError

from datasources.models import Datasource, TokenStatus, normalize_scopes

from .conftest import make_datasource

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("read,write", "read write"),
        ("read, write  admin", "read write admin"),
        ("read\nwrite,read", "read write"),
        ("", ""),
    ],
)
def test_scopes_accept_commas_or_spaces(raw, stored):
    assert normalize_scopes(raw) == stored


def test_authorization_code_needs_authorization_url():
    with pytest.raises(ValidationError) as err:
        make_datasource(authorization_url="")
    assert "authorization_url" in err.value.message_dict


def test_client_credentials_needs_no_authorization_url():
    datasource = make_datasource(grant_type="client_credentials", authorization_url="")
    assert datasource.token.status == TokenStatus.NOT_AUTHORIZED


@pytest.mark.parametrize("params", [["a"], {"a": 1}, {"a": ["b"]}, "text", {"nested": {"x": "y"}}])
def test_custom_auth_params_must_be_object_of_strings(params):
    with pytest.raises(ValidationError) as err:
        make_datasource(custom_auth_params=params)
    assert "custom_auth_params" in err.value.message_dict


@pytest.mark.parametrize(
    ("field", "url", "ok"),
    [
        ("base_url", "https://api.example.com/", True),
        ("base_url", "http://api.example.com/", False),
        ("base_url", "http://127.0.0.1:8000/", True),
        ("base_url", "http://127.9.9.9/", True),
        ("base_url", "http://localhost:9000/", True),
        ("base_url", "http://[::1]:9000/", True),
        ("access_token_url", "http://10.0.0.1/token", False),
        ("authorization_url", "ftp://example.com/", False),
    ],
)
def test_urls_must_be_https_except_loopback(field, url, ok):
    if ok:
        make_datasource(**{field: url})
    else:
        with pytest.raises(ValidationError) as err:
            make_datasource(**{field: url})
        assert field in err.value.message_dict


def test_saving_creates_a_not_authorized_token():
    datasource = make_datasource()
    assert datasource.token.status == TokenStatus.NOT_AUTHORIZED
    assert not datasource.token.has_access_token


def test_slug_is_unique():
    make_datasource()
    with pytest.raises(ValidationError):
        make_datasource(name="Other")
    assert Datasource.objects.count() == 1
