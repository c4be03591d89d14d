"""EMQX placeholders as pure code: substitution in one pass, escaping for URL, JSON, form, header."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from broker.auth.base import Credentials
from broker.auth.placeholders import (
    AUTHENTICATION_PLACEHOLDERS,
    AUTHORIZATION_PLACEHOLDERS,
    authentication_values,
    authorization_values,
    check_template,
    check_url_template,
    placeholders_in,
    render_form,
    render_header,
    render_json,
    render_text,
    render_url,
)
from listeners.address import AddressSource, ClientAddress
from listeners.tls import TlsInfo

#: Values that would break out of their place if not escaped.
HOSTILE = [
    "a/b",
    "a&b=c",
    "x=y",
    "frag#ment",
    "what?",
    "with space",
    "plus+sign",
    "per%cent",
    "%2F",
    "ünïcödé 雪",
    "emoji 🚀",
    'quote"s',
    "back\\slash",
    "ctl\x00\x01\x1f\x7f",
    "new\r\nline",
    "${password}",
    "",
]


def test_substitution() -> None:
    values = {"clientid": "c1", "username": "bob", "peerhost": "203.0.113.7"}
    assert render_text("${clientid}:${username}@${peerhost}", values) == "c1:bob@203.0.113.7"
    assert render_text("no placeholder", values) == "no placeholder"
    assert render_text("${clientid}${clientid}", values) == "c1c1"
    assert render_text("$clientid {clientid} $ {} ${", values) == "$clientid {clientid} $ {} ${"


@pytest.mark.parametrize(
    ("template", "values", "expected"),
    [
        ("${username}/${password}", {"username": "${password}", "password": "secret"}, "${password}/secret"),
        ("${clientid}", {"clientid": "${clientid}"}, "${clientid}"),
        ("${a}", {"a": "${b}", "b": "nope"}, "${b}"),
        # A value that completes a placeholder with the text around it does not make one.
        ("$${clientid}{username}", {"clientid": "{", "username": "x"}, "${{username}"),
    ],
)
def test_single_pass(template: str, values: dict[str, str], expected: str) -> None:
    assert render_text(template, values) == expected


@pytest.mark.parametrize(
    ("template", "values", "expected"),
    [
        ("u=${username}", {}, "u="),
        ("u=${username}", {"username": None}, "u="),
        ("u=${username}", {"username": ""}, "u="),
    ],
)
def test_missing_values_are_empty(template: str, values: dict[str, str | None], expected: str) -> None:
    assert render_text(template, values) == expected
    assert render_header(template, values) == expected
    assert render_url(f"http://h/{template}", values) == f"http://h/{expected}"


@pytest.mark.parametrize("value", HOSTILE)
def test_url_path_value_is_one_segment(value: str) -> None:
    url = render_url("http://auth.example:8080/users/${username}/check", {"username": value})
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.query, parts.fragment) == ("http", "auth.example:8080", "", "")
    segments = parts.path.split("/")
    assert len(segments) == 4, segments
    assert unquote(segments[2]) == value
    assert url.isascii()
    assert not any(c in url for c in ' \r\n"\\')


@pytest.mark.parametrize("value", HOSTILE)
def test_url_query_value_is_one_parameter(value: str) -> None:
    url = render_url(
        "http://h/auth?u=${username}&c=${clientid}&fixed=1", {"username": value, "clientid": "c"}
    )
    parts = urlsplit(url)
    assert parts.fragment == ""
    assert parse_qsl(parts.query, keep_blank_values=True) == [("u", value), ("c", "c"), ("fixed", "1")]


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("a/b", "a%2Fb"),
        ("a&b=c", "a%26b%3Dc"),
        ("frag#ment?", "frag%23ment%3F"),
        ("with space", "with%20space"),
        ("plus+", "plus%2B"),
        ("per%cent", "per%25cent"),
        ("ü", "%C3%BC"),
        ("safe-_.~", "safe-_.~"),
    ],
)
def test_url_value_encoding(value: str, encoded: str) -> None:
    assert render_url("http://h/${clientid}", {"clientid": value}) == f"http://h/{encoded}"


def test_url_template_text_is_kept_or_encoded() -> None:
    # The configured text keeps its reserved characters and existing escapes; what a URL cannot
    # hold is encoded.
    assert render_url("http://h/a%2Fb/c?x=1&y=2#f", {}) == "http://h/a%2Fb/c?x=1&y=2#f"
    assert render_url("http://h/päth", {}) == "http://h/p%C3%A4th"


@pytest.mark.parametrize("value", HOSTILE)
def test_json_body(value: str) -> None:
    body = render_json(
        {"username": "${username}", "greeting": "hi ${username}!", "fixed": "x"}, {"username": value}
    )
    assert body.isascii()
    assert json.loads(body) == {"username": value, "greeting": f"hi {value}!", "fixed": "x"}


def test_json_body_escapes() -> None:
    body = render_json({"u": "${username}"}, {"username": 'a"b\\c\n\x00é'})
    assert body == b'{"u":"a\\"b\\\\c\\n\\u0000\\u00e9"}'
    assert render_json({}, {}) == b"{}"


@pytest.mark.parametrize("value", HOSTILE)
def test_form_body(value: str) -> None:
    form = render_form(
        {"username": "${username}", "clientid": "${clientid}"}, {"username": value, "clientid": "c"}
    )
    assert form.isascii()
    assert parse_qsl(form, keep_blank_values=True) == [("username", value), ("clientid", "c")]


def test_form_encoding() -> None:
    assert render_form({"u": "${username}"}, {"username": "a b&c=d+é"}) == "u=a+b%26c%3Dd%2B%C3%A9"
    assert render_form({}, {}) == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "Bearer plain"),
        ("evil\r\nX-Admin: 1", "Bearer evilX-Admin: 1"),
        ("a\nb", "Bearer ab"),
        ("a\rb", "Bearer ab"),
        ("nul\x00", "Bearer nul"),
        ("tab\tok", "Bearer tab\tok"),
    ],
)
def test_header_values_never_break_lines(value: str, expected: str) -> None:
    assert render_header("Bearer ${password}", {"password": value}) == expected


@pytest.mark.parametrize(
    ("template", "allowed", "error"),
    [
        ("${clientid}", AUTHENTICATION_PLACEHOLDERS, None),
        ("plain text", AUTHENTICATION_PLACEHOLDERS, None),
        ("$ and {} and $x", AUTHENTICATION_PLACEHOLDERS, None),
        ("${topic}", AUTHORIZATION_PLACEHOLDERS, None),
        ("${topic}", AUTHENTICATION_PLACEHOLDERS, "unknown placeholder ${topic}"),
        ("${clientId}", AUTHENTICATION_PLACEHOLDERS, "unknown placeholder ${clientId}"),
        ("${password}", AUTHORIZATION_PLACEHOLDERS, "unknown placeholder ${password}"),
        ("${a}${b}", AUTHENTICATION_PLACEHOLDERS, "unknown placeholders ${a}, ${b}"),
        ("${}", AUTHENTICATION_PLACEHOLDERS, "unknown placeholder ${}"),
        ("${clientid", AUTHENTICATION_PLACEHOLDERS, "without a closing"),
        ("${a{b}", AUTHENTICATION_PLACEHOLDERS, "without a closing"),
    ],
)
def test_check_template(template: str, allowed: frozenset[str], error: str | None) -> None:
    message = check_template(template, allowed)
    if error is None:
        assert message is None
    else:
        assert message is not None
        assert error in message
        if error.startswith("unknown"):
            assert "(known: " in message and "${clientid}" in message  # says what would be right


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://h:8080/auth/${clientid}?u=${username}", True),
        ("http://${peerhost}/auth", False),
        ("http://h:${peerport}/auth", False),
        ("http://${username}@h/auth", False),
        ("http://h/auth/${nope}", False),
    ],
)
def test_check_url_template(url: str, ok: bool) -> None:
    assert (check_url_template(url, AUTHENTICATION_PLACEHOLDERS) is None) is ok


def test_placeholders_in() -> None:
    assert placeholders_in("${a}/${b}?${a}") == frozenset({"a", "b"})
    assert placeholders_in("none") == frozenset()


def test_placeholder_sets() -> None:
    # EMQX's names; authorization has the client's (not the password) and the request's.
    client = [
        "cert_common_name",
        "clientid",
        "listener",
        "peerhost",
        "peerport",
        "proto_ver",
        "proxy_peerhost",
    ]
    assert sorted(AUTHENTICATION_PLACEHOLDERS) == sorted([*client, "password", "username"])
    assert sorted(AUTHORIZATION_PLACEHOLDERS) == sorted([*client, "username", "topic", "action", "qos"])


PROXIED = ClientAddress(
    ip="203.0.113.7",
    port=50123,
    source=AddressSource.PROXY_PROTOCOL_V2,
    proxy_ip="127.0.0.1",
    proxy_port=40000,
    tls=TlsInfo(version="TLSv1.3", cert_cn="device-7", cert_verified=True, source="proxy_protocol"),
)


def test_authentication_values_use_the_real_address() -> None:
    credentials = Credentials("c1", "bob", b"s3cret", PROXIED, "tcp:default", 5)
    assert authentication_values(credentials) == {
        "clientid": "c1",
        "username": "bob",
        "password": "s3cret",
        "peerhost": "203.0.113.7",
        "peerport": "50123",
        "proxy_peerhost": "127.0.0.1",
        "cert_common_name": "device-7",
        "listener": "tcp:default",
        "proto_ver": "5",
    }


def test_authentication_values_of_a_direct_anonymous_client() -> None:
    credentials = Credentials(
        "c1", None, None, ClientAddress.direct("::ffff:192.0.2.1", 1234), "tcp:default", 4
    )
    values = authentication_values(credentials)
    assert values["peerhost"] == "192.0.2.1"
    assert (
        values["username"]
        == values["password"]
        == values["proxy_peerhost"]
        == values["cert_common_name"]
        == ""
    )
    assert values["proto_ver"] == "4"


def test_unverified_certificate_gives_no_common_name() -> None:
    unverified = TlsInfo(version="TLSv1.3", cert_cn="claimed", cert_verified=False, source="local")
    address = ClientAddress(ip="192.0.2.1", port=1, tls=unverified)
    assert (
        authentication_values(Credentials("c", None, None, address, "ssl:default", 5))["cert_common_name"]
        == ""
    )
    # What the caller says was verified wins.
    given = Credentials("c", None, None, PROXIED, "ssl:default", 5, cert_common_name="from-caller")
    assert authentication_values(given)["cert_common_name"] == "from-caller"


def test_non_utf8_password() -> None:
    credentials = Credentials("c", "u", b"\xff\xfe", PROXIED, "tcp:default", 5)
    with pytest.raises(UnicodeDecodeError):
        authentication_values(credentials)
    # Authorization never needs it.
    values = authorization_values(credentials, "publish", "a/b", 1)
    assert "password" not in values


def test_authorization_values() -> None:
    credentials = Credentials("c1", "bob", b"s3cret", PROXIED, "tcp:default", 5)
    values = authorization_values(credentials, "subscribe", "a/+/#", 2)
    assert set(values) == AUTHORIZATION_PLACEHOLDERS
    assert (values["action"], values["topic"], values["qos"]) == ("subscribe", "a/+/#", "2")
    assert values["peerhost"] == "203.0.113.7"
    assert "s3cret" not in values.values()


def test_a_dot_segment_value_cannot_walk_the_path() -> None:
    url = render_url("http://h/users/${username}/check", {"username": ".."})
    assert url == "http://h/users/%2E%2E/check"
    assert render_url("http://h/u/${username}", {"username": "a.b"}) == "http://h/u/a.b"
