"""``backend: http``: ask an HTTP server whether a client may connect, publish or subscribe (as EMQX).

The request is built from the configured ``url``, ``headers`` and ``body`` with their placeholders
filled in (:mod:`broker.auth.placeholders`): ``post`` sends the body as JSON, or as a form when the
configured ``content-type`` is ``application/x-www-form-urlencoded``; ``get`` sends the body's
fields as query parameters. The answer, as EMQX reads it:

- HTTP 200 with ``{"result": "allow" | "deny" | "ignore", "is_superuser": true | false}`` (JSON,
  or the same fields form-encoded when the server says ``application/x-www-form-urlencoded``);
- HTTP 204: allow;
- any other status, a body that is not such an object, an unknown ``result``, a timeout, a
  connection error: ``ignore`` with ``error`` set (the backend failed, not the client), logged at
  WARNING at most once every :data:`broker.logs.LOG_INTERVAL` seconds per backend.

One ``aiohttp.ClientSession`` per backend keeps up to ``pool_size`` connections open for reuse.
Neither the password nor a rendered request is ever logged: failures name the configured URL
without its query (and without user info), placeholders unexpanded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import yarl

from broker.auth.base import AuthError, Credentials, Outcome, Verdict
from broker.auth.placeholders import (
    AUTHENTICATION_PLACEHOLDERS,
    AUTHORIZATION_PLACEHOLDERS,
    authentication_values,
    authorization_values,
    check_settings,
    placeholders_in,
    render_form,
    render_header,
    render_json,
    render_url,
)
from broker.logs import Throttle
from broker.settings import HttpAuthSettings, HttpRequestSettings

__all__ = [
    "AUTHENTICATION_PLACEHOLDERS",
    "AUTHORIZATION_PLACEHOLDERS",
    "MAX_RESPONSE_BYTES",
    "HttpAuthenticator",
    "HttpAuthorizationSource",
    "check_settings",
]

logger = logging.getLogger(__name__)

#: The largest answer read: a verdict is a few dozen bytes, and a hostile or broken server must not
#: make the broker buffer without bound (one buffer per CONNECT in flight).
MAX_RESPONSE_BYTES: Final = 64 * 1024


#: Characters of a result quoted in a log line: the rest of what the server said is not ours to log.
_QUOTED_RESULT: Final = 40

_FORM: Final = "application/x-www-form-urlencoded"
_JSON: Final = "application/json"

#: An HTTP header name (RFC 9110 ``token``).


def _public_url(url: str) -> str:
    """The configured URL as logs may show it: no user info, query or fragment (they may hold a
    secret, or a placeholder for one). Never raises."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<the configured URL>"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def _with_query(url: str, query: str) -> str:
    """``url`` with ``query`` (already encoded) appended to its own, fragment dropped."""
    base = url.split("#", 1)[0]
    if not query:
        return base
    if "?" not in base:
        return f"{base}?{query}"
    return base + ("" if base.endswith(("?", "&")) else "&") + query


def _is_true(value: Any) -> bool:
    # Stricter than EMQX, which takes anything but false/0/""/null as true: only an explicit yes
    # makes a superuser.
    return value is True or value == 1 or (isinstance(value, str) and value.lower() == "true")


class _HttpCaller:
    """The request machinery shared by authentication and authorization: one session, templates
    rendered per call, EMQX's reading of the answer."""

    def __init__(self, settings: HttpRequestSettings, allowed: frozenset[str], label: str) -> None:
        self._settings = settings
        self._allowed = allowed
        #: ``http authentication``/``http authorization``: how log lines name this backend.
        self._label = label
        self._where = _public_url(settings.url)
        self._session: aiohttp.ClientSession | None = None
        self.throttle = Throttle()
        templates = [settings.url, *settings.headers.values(), *settings.body.values()]
        #: The placeholders the request uses.
        self.used: frozenset[str] = frozenset().union(*(placeholders_in(text) for text in templates))

    async def start(self) -> None:
        """Check the templates and open the session.

        Raises:
            AuthError: a template is invalid (the message names it).
        """
        problems = check_settings(self._settings, self._allowed)
        if problems:
            raise AuthError(f"{self._label}: " + "; ".join(f"{key}: {message}" for key, message in problems))
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._settings.pool_size),
            timeout=aiohttp.ClientTimeout(total=self._settings.request_timeout),
            # A cookie one client's answer set must never be sent with another client's request.
            cookie_jar=aiohttp.DummyCookieJar(),
            # A compressed answer could expand far past MAX_RESPONSE_BYTES within one chunk, before
            # it can be counted: ask for none, and never inflate.
            headers={"accept-encoding": "identity"},
            auto_decompress=False,
            trust_env=False,
        )

    async def close(self) -> None:
        """Close the session and its connections. Never raises."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self.throttle.flush(logger, self._label)

    def _request(self, values: Mapping[str, str]) -> tuple[str, dict[str, str], bytes | None]:
        """The URL (fully encoded), headers and body of one request. Never raises."""
        settings = self._settings
        url = render_url(settings.url, values)
        headers = {name: render_header(value, values) for name, value in settings.headers.items()}
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
        if settings.method == "get":
            # No body to describe; its fields travel in the query.
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            return _with_query(url, render_form(settings.body, values)), headers, None
        if content_type is not None and content_type.split(";")[0].strip().lower() == _FORM:
            return url, headers, render_form(settings.body, values).encode("ascii")
        if content_type is None:
            headers["content-type"] = _JSON
        return url, headers, render_json(settings.body, values)

    def _failure(self, reason: str) -> Verdict:
        self.throttle.log(logger, logging.WARNING, "%s: %s", self._label, reason)
        return Verdict(Outcome.IGNORE, reason=reason, error=True)

    async def call(self, values: Mapping[str, str]) -> Verdict:
        """Send one request and read its answer. Never raises: a failure is ``ignore`` with
        ``error`` set (and a throttled WARNING)."""
        session = self._session
        if session is None:
            return self._failure(f"not started, {self._where} was not asked")
        url, headers, body = self._request(values)
        try:
            async with session.request(
                self._settings.method.upper(),
                # Sent as rendered: re-quoting would decode some of the escapes of the values.
                yarl.URL(url, encoded=True),
                headers=headers,
                data=body,
                # EMQX does not follow redirects either; a 3xx is a failure like any non-2xx.
                allow_redirects=False,
            ) as response:
                return await self._answer(response)
        except TimeoutError:
            # Before ClientError: aiohttp's timeouts are both.
            return self._failure(f"timeout: no answer from {self._where} within {self._timeout_text}")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                return self._failure(f"connection refused by {self._where}")
            detail = exc.os_error.strerror or type(exc.os_error).__name__
            return self._failure(f"cannot connect to {self._where}: {detail}")
        except aiohttp.ClientError as exc:
            # Not str(exc): some aiohttp errors quote the request URL, query included.
            return self._failure(f"request to {self._where} failed: {type(exc).__name__}")
        except Exception as exc:
            # Whatever else (a header aiohttp refuses...): the chain is promised an answer.
            return self._failure(f"request to {self._where} failed: {type(exc).__name__}")

    @property
    def _timeout_text(self) -> str:
        return f"{self._settings.request_timeout:g}s"

    async def _answer(self, response: aiohttp.ClientResponse) -> Verdict:
        """EMQX's reading of a response. Never raises but what reading the body raises
        (aiohttp.ClientError, TimeoutError)."""
        status = response.status
        if status == 204:
            return Verdict(Outcome.ALLOW, reason=f"HTTP 204 from {self._where}")
        if status != 200:
            return self._failure(f"HTTP {status} from {self._where}")
        if response.content_length is not None and response.content_length > MAX_RESPONSE_BYTES:
            response.close()  # the rest is never read: the connection cannot be reused
            return self._failure(f"answer from {self._where} is larger than {MAX_RESPONSE_BYTES} bytes")
        body = await self._read_capped(response)
        if body is None:
            return self._failure(f"answer from {self._where} is larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            if response.content_type == _FORM:
                fields: Any = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
            else:
                fields = json.loads(body)
        except (ValueError, RecursionError):
            # ValueError: not JSON or not UTF-8; RecursionError: nested deeper than the parser goes.
            return self._failure(f"answer from {self._where} is not JSON")
        if not isinstance(fields, dict):
            return self._failure(f"answer from {self._where} is not a JSON object")
        result = fields.get("result")
        if result == "allow":
            superuser = _is_true(fields.get("is_superuser", False))
            return Verdict(Outcome.ALLOW, is_superuser=superuser, reason=f"allowed by {self._where}")
        if result == "deny":
            return Verdict(Outcome.DENY, reason=f"denied by {self._where}")
        if result == "ignore":
            return Verdict(Outcome.IGNORE, reason=f"ignored by {self._where}")
        quoted = repr(result)[:_QUOTED_RESULT]
        return self._failure(f"unknown result {quoted} from {self._where} (expected allow, deny or ignore)")

    @staticmethod
    async def _read_capped(response: aiohttp.ClientResponse) -> bytes | None:
        """The body, or None (and the connection dropped) past :data:`MAX_RESPONSE_BYTES`.

        Raises:
            aiohttp.ClientError, TimeoutError: reading failed.
        """
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await response.content.read(MAX_RESPONSE_BYTES + 1 - size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                response.close()
                return None


class HttpAuthenticator:
    """``mechanism: password_based, backend: http`` (implements :class:`broker.auth.base.Authenticator`)."""

    name = "password_based:http"

    def __init__(self, settings: HttpAuthSettings) -> None:
        self._caller = _HttpCaller(settings, AUTHENTICATION_PLACEHOLDERS, "http authentication")
        #: The server can only vouch for a username it is sent.
        self.proves_username = "username" in self._caller.used

    async def start(self) -> None:
        """Open the HTTP session.

        Raises:
            AuthError: a template of the settings is invalid.
        """
        await self._caller.start()

    async def authenticate(self, credentials: Credentials) -> Verdict:
        """Ask the server. Never raises: a failure is ``ignore`` with ``error`` set."""
        try:
            values = authentication_values(credentials)
        except UnicodeDecodeError:
            if "password" in self._caller.used:
                # Not the server's failure: this backend cannot judge such a password, others may.
                return Verdict(Outcome.IGNORE, reason="the password is not UTF-8 text, which cannot be sent")
            values = authentication_values(replace(credentials, password=None))
        return await self._caller.call(values)

    async def close(self) -> None:
        """Close the HTTP session. Never raises."""
        await self._caller.close()


class HttpAuthorizationSource:
    """An ``authorization.sources`` entry of ``type: http``: the server decides each PUBLISH and
    SUBSCRIBE."""

    name = "http"

    def __init__(self, settings: HttpRequestSettings) -> None:
        self._caller = _HttpCaller(settings, AUTHORIZATION_PLACEHOLDERS, "http authorization")

    async def start(self) -> None:
        """Open the HTTP session.

        Raises:
            AuthError: a template of the settings is invalid.
        """
        await self._caller.start()

    async def authorize(self, credentials: Credentials, action: str, topic: str, qos: int) -> Outcome:
        """Ask the server whether ``credentials``' client may ``action`` (``publish`` or
        ``subscribe``) ``topic`` at ``qos``. Never raises: a failure is ``IGNORE`` (logged)."""
        verdict = await self._caller.call(authorization_values(credentials, action, topic, qos))
        return verdict.outcome

    async def close(self) -> None:
        """Close the HTTP session. Never raises."""
        await self._caller.close()
