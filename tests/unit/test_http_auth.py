"""HTTP authentication and authorization against a real aiohttp server on 127.0.0.1.

The server records every request and answers as each test says; failures (500, bad JSON, a huge
body, no answer, a closed port) must all give ``ignore`` with ``error`` set, never raise, and never
log the password.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

from broker.auth.base import AuthError, Credentials, Outcome, Verdict
from broker.auth.http import (
    AUTHENTICATION_PLACEHOLDERS,
    AUTHORIZATION_PLACEHOLDERS,
    MAX_RESPONSE_BYTES,
    HttpAuthenticator,
    HttpAuthorizationSource,
    check_settings,
)
from broker.settings import HttpAuthSettings, HttpRequestSettings
from listeners.address import AddressSource, ClientAddress
from listeners.tls import TlsInfo

PASSWORD = 'pa ss&w=rd/%?#"é'

#: A client behind a load balancer that spoke PROXY v2: the real address is 203.0.113.7.
PROXIED = ClientAddress(
    ip="203.0.113.7",
    port=50123,
    source=AddressSource.PROXY_PROTOCOL_V2,
    proxy_ip="127.0.0.1",
    proxy_port=40000,
    tls=TlsInfo(version="TLSv1.3", cert_cn="device-7", cert_verified=True, source="proxy_protocol"),
)

CREDENTIALS = Credentials(
    client_id="sensor/1",
    username="bob & alice",
    password=PASSWORD.encode(),
    address=PROXIED,
    listener_id="tcp:default",
    proto_ver=5,
)

#: Every authentication placeholder, as a JSON body (key = placeholder name).
ALL_FIELDS = {name: f"${{{name}}}" for name in sorted(AUTHENTICATION_PLACEHOLDERS)}

EXPECTED = {
    "clientid": "sensor/1",
    "username": "bob & alice",
    "password": PASSWORD,
    "peerhost": "203.0.113.7",
    "peerport": "50123",
    "proxy_peerhost": "127.0.0.1",
    "cert_common_name": "device-7",
    "listener": "tcp:default",
    "proto_ver": "5",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    raw_path: str
    path: str
    query: dict[str, str]
    #: As sent, not decoded.
    raw_query: str
    headers: dict[str, str]
    body: bytes
    remote_port: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Backend:
    """The HTTP server of a test."""

    base: str = ""
    requests: list[Seen] = field(default_factory=list)
    answer: Handler | None = None
    #: Never set during a test: a handler waiting on it never answers (set at teardown).
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        assert request.transport is not None
        self.requests.append(
            Seen(
                method=request.method,
                raw_path=request.raw_path.split("?", 1)[0],
                path=request.path,
                query=dict(request.query),
                raw_query=request.raw_path.partition("?")[2],
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                remote_port=request.transport.get_extra_info("peername")[1],
            )
        )
        if self.answer is None:
            return web.json_response({"result": "allow"})
        return await self.answer(request)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    served = Backend()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", served.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    served.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield served
    served.release.set()
    await runner.cleanup()


@pytest.fixture
async def make_auth() -> AsyncIterator[Callable[..., Awaitable[HttpAuthenticator]]]:
    made: list[HttpAuthenticator] = []

    async def make(**fields: Any) -> HttpAuthenticator:
        authenticator = HttpAuthenticator(HttpAuthSettings(**fields))
        await authenticator.start()
        made.append(authenticator)
        return authenticator

    yield make
    for authenticator in made:
        await authenticator.close()


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def json_answer(payload: Any, status: int = 200) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response(payload, status=status)

    return answer


def raw_answer(body: bytes, status: int = 200, content_type: str = "application/json") -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, content_type=content_type)

    return answer


async def test_post_json_carries_the_real_address(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    auth = await make_auth(url=f"{backend.base}/auth", body=ALL_FIELDS)
    verdict = await auth.authenticate(CREDENTIALS)
    assert verdict == Verdict(Outcome.ALLOW, reason=f"allowed by {backend.base}/auth")
    (seen,) = backend.requests
    assert (seen.method, seen.path) == ("POST", "/auth")
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == EXPECTED
    assert seen.query == {}


async def test_direct_client_has_no_proxy_peerhost(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    auth = await make_auth(url=f"{backend.base}/auth", body=ALL_FIELDS)
    direct = Credentials("c", None, None, ClientAddress.direct("192.0.2.9", 5555), "tcp:default", 4)
    await auth.authenticate(direct)
    body = backend.requests[0].json()
    assert (body["peerhost"], body["peerport"], body["proxy_peerhost"]) == ("192.0.2.9", "5555", "")
    assert (body["username"], body["password"], body["cert_common_name"], body["proto_ver"]) == (
        "",
        "",
        "",
        "4",
    )


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (json_answer({"result": "allow"}), (Outcome.ALLOW, False, False)),
        (json_answer({"result": "allow", "is_superuser": True}), (Outcome.ALLOW, True, False)),
        (json_answer({"result": "allow", "is_superuser": "true"}), (Outcome.ALLOW, True, False)),
        (json_answer({"result": "allow", "is_superuser": 1}), (Outcome.ALLOW, True, False)),
        (json_answer({"result": "allow", "is_superuser": False}), (Outcome.ALLOW, False, False)),
        (json_answer({"result": "allow", "is_superuser": "yes"}), (Outcome.ALLOW, False, False)),
        (json_answer({"result": "deny"}), (Outcome.DENY, False, False)),
        (json_answer({"result": "deny", "is_superuser": True}), (Outcome.DENY, False, False)),
        (json_answer({"result": "ignore"}), (Outcome.IGNORE, False, False)),
        (raw_answer(b"", status=204), (Outcome.ALLOW, False, False)),
        (
            raw_answer(b"result=allow&is_superuser=true", content_type="application/x-www-form-urlencoded"),
            (Outcome.ALLOW, True, False),
        ),
        (json_answer({"result": "allow"}, status=500), (Outcome.IGNORE, False, True)),
        (json_answer({"result": "allow"}, status=503), (Outcome.IGNORE, False, True)),
        (json_answer({"result": "allow"}, status=401), (Outcome.IGNORE, False, True)),
        (json_answer({"result": "allow"}, status=201), (Outcome.IGNORE, False, True)),
        (raw_answer(b"not json"), (Outcome.IGNORE, False, True)),
        (raw_answer(b'{"result": "allow"'), (Outcome.IGNORE, False, True)),
        (raw_answer(b"\xff\xfe"), (Outcome.IGNORE, False, True)),
        (raw_answer(b"[" * 100_000), (Outcome.IGNORE, False, True)),
        (raw_answer(b""), (Outcome.IGNORE, False, True)),
        (json_answer(["allow"]), (Outcome.IGNORE, False, True)),
        (json_answer({"result": "maybe"}), (Outcome.IGNORE, False, True)),
        (json_answer({"result": "ALLOW"}), (Outcome.IGNORE, False, True)),
        (json_answer({}), (Outcome.IGNORE, False, True)),
    ],
)
async def test_answers(
    backend: Backend,
    make_auth: Callable[..., Awaitable[HttpAuthenticator]],
    answer: Handler,
    expected: tuple[Outcome, bool, bool],
) -> None:
    backend.answer = answer
    auth = await make_auth(url=f"{backend.base}/auth", body={"u": "${username}"})
    verdict = await auth.authenticate(CREDENTIALS)
    assert (verdict.outcome, verdict.is_superuser, verdict.error) == expected
    assert len(backend.requests) == 1


async def test_failure_reason_names_the_url_without_its_query(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]], caplog: pytest.LogCaptureFixture
) -> None:
    backend.answer = json_answer({}, status=503)
    auth = await make_auth(
        method="get",
        url=f"{backend.base}/auth/${{clientid}}?token=${{password}}&key=static-secret",
        body={"password": "${password}"},
    )
    with caplog.at_level(logging.WARNING, logger="broker.auth.http"):
        verdict = await auth.authenticate(CREDENTIALS)
    assert verdict == Verdict(
        Outcome.IGNORE, reason=f"HTTP 503 from {backend.base}/auth/${{clientid}}", error=True
    )
    assert backend.requests[0].query["token"] == PASSWORD  # the password did travel
    for secret in (PASSWORD, "static-secret", "token=", "pa ss", "pa%20ss"):
        assert secret not in caplog.text
        assert secret not in verdict.reason
    assert f"HTTP 503 from {backend.base}/auth/${{clientid}}" in caplog.text


async def test_redirects_are_not_followed(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        if request.path == "/auth":
            raise web.HTTPFound("/elsewhere")
        return web.json_response({"result": "allow"})

    backend.answer = redirect
    auth = await make_auth(url=f"{backend.base}/auth")
    verdict = await auth.authenticate(CREDENTIALS)
    assert (verdict.outcome, verdict.error, verdict.reason) == (
        Outcome.IGNORE,
        True,
        f"HTTP 302 from {backend.base}/auth",
    )
    assert [seen.path for seen in backend.requests] == ["/auth"]


async def test_huge_body_with_length_is_refused(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    # Valid JSON after 1 MiB of whitespace: refused for its size, not its content.
    backend.answer = raw_answer(b" " * (1 << 20) + b'{"result": "allow"}')
    auth = await make_auth(url=f"{backend.base}/auth")
    verdict = await auth.authenticate(CREDENTIALS)
    assert (verdict.outcome, verdict.error) == (Outcome.IGNORE, True)
    assert f"larger than {MAX_RESPONSE_BYTES} bytes" in verdict.reason


async def test_huge_chunked_body_is_read_no_further_than_the_cap(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    written = 0
    stopped = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)  # no Content-Length: chunked
        try:
            while written < 64 << 20:  # far more than any socket buffer: the client must hang up
                await response.write(b" " * 16384)
                written += 16384
        except ConnectionError:
            pass
        finally:
            stopped.set()
        return response

    backend.answer = endless
    auth = await make_auth(url=f"{backend.base}/auth")
    verdict = await auth.authenticate(CREDENTIALS)
    assert (verdict.outcome, verdict.error) == (Outcome.IGNORE, True)
    assert f"larger than {MAX_RESPONSE_BYTES} bytes" in verdict.reason
    await asyncio.wait_for(stopped.wait(), 10)
    assert written < 64 << 20  # the server was cut off, not read to the end


async def test_no_answer_within_request_timeout(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    async def never(request: web.Request) -> web.StreamResponse:
        await backend.release.wait()
        return web.json_response({"result": "allow"})

    backend.answer = never
    auth = await make_auth(url=f"{backend.base}/auth", request_timeout=0.2)
    verdict = await asyncio.wait_for(auth.authenticate(CREDENTIALS), 10)
    assert verdict == Verdict(
        Outcome.IGNORE, reason=f"timeout: no answer from {backend.base}/auth within 0.2s", error=True
    )


async def test_connection_refused(
    closed_port: int, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    auth = await make_auth(url=f"http://127.0.0.1:{closed_port}/auth")
    verdict = await auth.authenticate(CREDENTIALS)
    assert verdict == Verdict(
        Outcome.IGNORE, reason=f"connection refused by http://127.0.0.1:{closed_port}/auth", error=True
    )


async def test_get_sends_the_body_as_an_escaped_query(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    auth = await make_auth(method="get", url=f"{backend.base}/auth?fixed=1&c=${{clientid}}", body=ALL_FIELDS)
    assert (await auth.authenticate(CREDENTIALS)).outcome is Outcome.ALLOW
    (seen,) = backend.requests
    assert (seen.method, seen.path, seen.body) == ("GET", "/auth", b"")
    assert seen.query == {"fixed": "1", "c": "sensor/1", **EXPECTED}
    assert "content-type" not in seen.headers
    # Every value escaped: the only '&' and '=' are the separators.
    assert seen.raw_query.count("&") == len(EXPECTED) + 1
    assert seen.raw_query.count("=") == len(EXPECTED) + 2
    assert not any(c in seen.raw_query for c in ' #?"/é')
    assert "&password=pa+ss%26w%3Drd%2F%25%3F%23%22%C3%A9&" in seen.raw_query
    assert "c=sensor%2F1&" in seen.raw_query


async def test_url_path_values_stay_one_segment(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    auth = await make_auth(url=f"{backend.base}/users/${{clientid}}/check")
    tricky = Credentials("a/b?c=d#e f%", None, None, PROXIED, "tcp:default", 5)
    await auth.authenticate(tricky)
    (seen,) = backend.requests
    assert seen.raw_path == "/users/a%2Fb%3Fc%3Dd%23e%20f%25/check"
    assert seen.query == {}


async def test_post_form(backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]) -> None:
    auth = await make_auth(
        url=f"{backend.base}/auth",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=ALL_FIELDS,
    )
    await auth.authenticate(CREDENTIALS)
    (seen,) = backend.requests
    assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
    assert dict(parse_qsl(seen.body.decode("ascii"), keep_blank_values=True)) == EXPECTED


async def test_headers_get_placeholders_but_never_new_lines(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    auth = await make_auth(
        url=f"{backend.base}/auth",
        headers={"x-client": "${clientid}", "x-real-ip": "${peerhost}", "authorization": "Bearer static"},
    )
    evil = Credentials("c1\r\nX-Admin: yes\r\n\r\n{}", "u", b"p", PROXIED, "tcp:default", 5)
    assert (await auth.authenticate(evil)).outcome is Outcome.ALLOW
    (seen,) = backend.requests
    assert seen.headers["x-client"] == "c1X-Admin: yes{}"
    assert "x-admin" not in seen.headers
    assert seen.headers["x-real-ip"] == "203.0.113.7"
    assert seen.headers["authorization"] == "Bearer static"
    # No content-type configured: JSON says so itself.
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {}


async def test_connections_are_reused(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    auth = await make_auth(url=f"{backend.base}/auth", body={"u": "${username}"})
    for _ in range(3):
        assert (await auth.authenticate(CREDENTIALS)).outcome is Outcome.ALLOW
    assert len({seen.remote_port for seen in backend.requests}) == 1
    # Error answers do not break reuse either.
    backend.answer = json_answer({}, status=500)
    await auth.authenticate(CREDENTIALS)
    assert len({seen.remote_port for seen in backend.requests}) == 1


async def test_pool_size_limits_connections(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    auth = await make_auth(url=f"{backend.base}/auth", pool_size=1)
    verdicts = await asyncio.gather(*(auth.authenticate(CREDENTIALS) for _ in range(5)))
    assert all(verdict.outcome is Outcome.ALLOW for verdict in verdicts)
    assert len(backend.requests) == 5
    assert len({seen.remote_port for seen in backend.requests}) == 1


async def test_cookies_are_never_sent_back(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    async def with_cookie(request: web.Request) -> web.StreamResponse:
        response = web.json_response({"result": "allow"})
        response.set_cookie("session", "of-the-first-client")
        return response

    backend.answer = with_cookie
    auth = await make_auth(url=f"{backend.base}/auth")
    await auth.authenticate(CREDENTIALS)
    await auth.authenticate(CREDENTIALS)
    assert all("cookie" not in seen.headers for seen in backend.requests)


async def test_password_that_is_not_utf8(
    backend: Backend, make_auth: Callable[..., Awaitable[HttpAuthenticator]]
) -> None:
    binary = Credentials("c", "u", b"\xff\x00\xfe", PROXIED, "tcp:default", 5)
    with_password = await make_auth(url=f"{backend.base}/auth", body={"p": "${password}"})
    verdict = await with_password.authenticate(binary)
    assert (verdict.outcome, verdict.error) == (Outcome.IGNORE, False)
    assert backend.requests == []
    # A request that does not carry the password is sent anyway.
    without = await make_auth(url=f"{backend.base}/auth", body={"u": "${username}"})
    assert (await without.authenticate(binary)).outcome is Outcome.ALLOW
    assert backend.requests[0].json() == {"u": "u"}


async def test_failures_are_logged_once_per_interval(
    closed_port: int, make_auth: Callable[..., Awaitable[HttpAuthenticator]], caplog: pytest.LogCaptureFixture
) -> None:
    auth = await make_auth(url=f"http://127.0.0.1:{closed_port}/auth", body={"p": "${password}"})
    with caplog.at_level(logging.WARNING, logger="broker.auth.http"):
        for _ in range(5):
            assert (await auth.authenticate(CREDENTIALS)).error
    records = [r for r in caplog.records if r.name == "broker.auth.http"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "http authentication: connection refused by" in records[0].getMessage()
    assert PASSWORD not in caplog.text
    # What was held back is reported at close.
    with caplog.at_level(logging.WARNING, logger="broker.auth.http"):
        await auth.close()
    assert "4 more like it since the last report" in caplog.text


async def test_not_started_is_a_failure() -> None:
    auth = HttpAuthenticator(HttpAuthSettings(url="http://127.0.0.1:1/auth"))
    verdict = await auth.authenticate(CREDENTIALS)
    assert (verdict.outcome, verdict.error) == (Outcome.IGNORE, True)
    await auth.close()  # closing what never started is fine


async def test_start_refuses_bad_templates() -> None:
    auth = HttpAuthenticator(HttpAuthSettings(url="http://127.0.0.1:1/auth", body={"t": "${topic}"}))
    with pytest.raises(AuthError, match=r"body\.t: unknown placeholder \$\{topic\}"):
        await auth.start()


def test_check_settings() -> None:
    settings = HttpRequestSettings(
        url="http://${peerhost}/auth",
        headers={"x-${clientid}": "v", "x-ok": "${nope}", "bad name": "v", "x-crlf": "a\r\nb"},
        body={"${clientid}": "x", "u": "${username", "ok": "${clientid}"},
    )
    problems = dict(check_settings(settings, AUTHENTICATION_PLACEHOLDERS))
    assert set(problems) == {
        "url",
        "headers.x-${clientid}",
        "headers.x-ok",
        "headers.bad name",
        "headers.x-crlf",
        "body.${clientid}",
        "body.u",
    }
    assert "scheme or host" in problems["url"]
    assert "unknown placeholder ${nope}" in problems["headers.x-ok"]
    assert check_settings(HttpRequestSettings(url="http://h/a?t=${topic}"), AUTHORIZATION_PLACEHOLDERS) == []
    assert (
        check_settings(HttpRequestSettings(url="http://h/a?p=${password}"), AUTHORIZATION_PLACEHOLDERS) != []
    )
    assert check_settings(HttpRequestSettings(), AUTHENTICATION_PLACEHOLDERS) == [
        ("url", "is required (e.g. 'http://127.0.0.1:8080/auth')")
    ]


@pytest.fixture
async def make_source() -> AsyncIterator[Callable[..., Awaitable[HttpAuthorizationSource]]]:
    made: list[HttpAuthorizationSource] = []

    async def make(**fields: Any) -> HttpAuthorizationSource:
        source = HttpAuthorizationSource(HttpRequestSettings(**fields))
        await source.start()
        made.append(source)
        return source

    yield make
    for source in made:
        await source.close()


AUTHZ_BODY = {
    "topic": "${topic}",
    "action": "${action}",
    "qos": "${qos}",
    "clientid": "${clientid}",
    "peerhost": "${peerhost}",
}


async def test_authorization_request(
    backend: Backend, make_source: Callable[..., Awaitable[HttpAuthorizationSource]]
) -> None:
    source = await make_source(url=f"{backend.base}/acl", body=AUTHZ_BODY)
    assert await source.authorize(CREDENTIALS, "publish", "a/b c/ü", 1) is Outcome.ALLOW
    assert await source.authorize(CREDENTIALS, "subscribe", "a/+/#", 2) is Outcome.ALLOW
    first, second = (seen.json() for seen in backend.requests)
    assert first == {
        "topic": "a/b c/ü",
        "action": "publish",
        "qos": "1",
        "clientid": "sensor/1",
        "peerhost": "203.0.113.7",
    }
    assert second["topic"] == "a/+/#"
    assert (second["action"], second["qos"]) == ("subscribe", "2")


async def test_authorization_get(
    backend: Backend, make_source: Callable[..., Awaitable[HttpAuthorizationSource]]
) -> None:
    source = await make_source(method="get", url=f"{backend.base}/acl/${{action}}", body=AUTHZ_BODY)
    await source.authorize(CREDENTIALS, "subscribe", "a/#/+?&=", 0)
    (seen,) = backend.requests
    assert seen.path == "/acl/subscribe"
    assert seen.query["topic"] == "a/#/+?&="
    assert seen.query["qos"] == "0"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (json_answer({"result": "allow"}), Outcome.ALLOW),
        (json_answer({"result": "deny"}), Outcome.DENY),
        (json_answer({"result": "ignore"}), Outcome.IGNORE),
        (raw_answer(b"", status=204), Outcome.ALLOW),
        (json_answer({"result": "allow"}, status=500), Outcome.IGNORE),
        (raw_answer(b"<html>"), Outcome.IGNORE),
        (json_answer({"result": "yes"}), Outcome.IGNORE),
    ],
)
async def test_authorization_answers(
    backend: Backend,
    make_source: Callable[..., Awaitable[HttpAuthorizationSource]],
    answer: Handler,
    expected: Outcome,
) -> None:
    backend.answer = answer
    source = await make_source(url=f"{backend.base}/acl", body=AUTHZ_BODY)
    assert await source.authorize(CREDENTIALS, "publish", "t", 0) is expected


async def test_authorization_failures(
    closed_port: int,
    make_source: Callable[..., Awaitable[HttpAuthorizationSource]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = await make_source(url=f"http://127.0.0.1:{closed_port}/acl", body=AUTHZ_BODY)
    with caplog.at_level(logging.WARNING, logger="broker.auth.http"):
        assert await source.authorize(CREDENTIALS, "publish", "t", 0) is Outcome.IGNORE
        assert await source.authorize(CREDENTIALS, "publish", "t", 0) is Outcome.IGNORE
    assert [r.getMessage() for r in caplog.records] == [
        f"http authorization: connection refused by http://127.0.0.1:{closed_port}/acl"
    ]


async def test_authorization_source_refuses_the_password_placeholder() -> None:
    source = HttpAuthorizationSource(
        HttpRequestSettings(url="http://127.0.0.1:1/acl", body={"p": "${password}"})
    )
    with pytest.raises(AuthError, match="password"):
        await source.start()
