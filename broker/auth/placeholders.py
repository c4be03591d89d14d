"""EMQX's ``${...}`` placeholders in HTTP callouts: which exist, and how each is filled in safely.

A template is the configured text of a URL, a header value or a body value. Each placeholder is
replaced by a value of the client (``${clientid}``, ``${peerhost}``...) in a single pass: a value
holding ``${password}`` stays that literal text, it is never substituted again. Every value is
escaped for where it lands: percent-encoded in a URL, a JSON string in a JSON body, form-encoded
in a form, stripped of CR and LF in a header. An unknown placeholder is a configuration error,
found by :func:`check_template` before anything is sent.

``${peerhost}`` is the *real* client address (what PROXY protocol or ``X-Forwarded-For`` said);
``${proxy_peerhost}`` is the load balancer's, ``""`` for a direct client.

Names in the sets and in the ``values`` mappings below are bare (``"clientid"``, not
``"${clientid}"``). Pure code, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from broker.auth.base import Credentials


class HttpRequest(Protocol):
    """The templates of an HTTP callout (``broker.settings.HttpRequestSettings``)."""

    @property
    def url(self) -> str:
        """The URL template."""

    @property
    def headers(self) -> dict[str, str]:
        """Header name -> value template."""

    @property
    def body(self) -> dict[str, str]:
        """Body field -> value template."""


#: An HTTP header name (RFC 9110 token).
_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

#: What an authentication request may carry (EMQX's names).
AUTHENTICATION_PLACEHOLDERS: Final = frozenset(
    {
        "clientid",
        "username",
        "password",
        "peerhost",
        "peerport",
        "proxy_peerhost",
        "cert_common_name",
        "listener",
        "proto_ver",
    }
)

#: What an authorization request may carry: the client, and what it asks to do. Not the password:
#: EMQX's authorization requests have none, and it would be sent again on every PUBLISH.
AUTHORIZATION_PLACEHOLDERS: Final = (AUTHENTICATION_PLACEHOLDERS - {"password"}) | {"topic", "action", "qos"}

#: ``${name}``; a name cannot hold braces, so ``${a{b}`` is an unclosed placeholder.
_PLACEHOLDER: Final = re.compile(r"\$\{([^{}]*)\}")

#: The characters of a URL template's own text that are sent as they are: RFC 3986's unreserved and
#: reserved characters, and ``%`` (the template may already be percent-encoded). Anything else in
#: the configured text (a space, non-ASCII) is percent-encoded.
_URL_LITERAL_SAFE: Final = "-._~:/?#[]@!$&'()*+,;=%"

#: The scheme and authority of a URL (``https://user@host:443``): no placeholder may stand there.
_URL_AUTHORITY: Final = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")

#: What a header value must never carry: a line break would start another header (or the body).
_HEADER_BREAKS: Final = str.maketrans("", "", "\r\n\0")


def _spelled(names: frozenset[str]) -> str:
    return ", ".join(f"${{{name}}}" for name in sorted(names))


def check_template(text: str, allowed: frozenset[str]) -> str | None:
    """An error message if ``text`` holds a placeholder not in ``allowed`` or an unclosed ``${``.

    Returns None when the template is fine. Never raises.
    """
    unknown = sorted({match.group(1) for match in _PLACEHOLDER.finditer(text)} - allowed)
    if unknown:
        named = ", ".join(f"${{{name}}}" for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        return f"unknown placeholder{plural} {named} (known: {_spelled(allowed)})"
    if "${" in _PLACEHOLDER.sub("", text):
        return "'${' without a closing '}' (placeholders are written ${name})"
    return None


def check_url_template(url: str, allowed: frozenset[str]) -> str | None:
    """Like :func:`check_template`, and no placeholder in the scheme, host or port.

    A client's value deciding which server is asked would let it point the broker anywhere.
    Never raises.
    """
    authority = _URL_AUTHORITY.match(url)
    if authority is not None and "${" in authority.group(0):
        return "placeholders may stand in the path and query of the URL only, not in its scheme or host"
    return check_template(url, allowed)


def placeholders_in(text: str) -> frozenset[str]:
    """The names of the placeholders ``text`` uses. Never raises."""
    return frozenset(match.group(1) for match in _PLACEHOLDER.finditer(text))


def _substitute(template: str, values: Mapping[str, str | None], escape: Callable[[str], str]) -> str:
    # One re.sub over the template: substituted text is never scanned again.
    return _PLACEHOLDER.sub(lambda match: escape(values.get(match.group(1)) or ""), template)


def _strip_breaks(value: str) -> str:
    return value.translate(_HEADER_BREAKS)


def render_text(template: str, values: Mapping[str, str | None]) -> str:
    """``template`` with its placeholders replaced, unescaped (for a JSON string or a form field,
    whose encoder escapes the whole value). A name missing from ``values``, or None, gives ``""``.

    Never raises.
    """
    return _substitute(template, values, str)


def render_url(template: str, values: Mapping[str, str | None]) -> str:
    """The URL with each value percent-encoded (every character but ``A-Za-z0-9_.-~``), so a value
    can never add a path segment, a query parameter or a fragment.

    The template's own text is kept, except characters a URL cannot hold (spaces, non-ASCII), which
    are percent-encoded. The result is fully encoded: send it as it is (``yarl.URL(url,
    encoded=True)``), not re-quoted. Never raises.
    """
    parts: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        parts.append(quote(template[position : match.start()], safe=_URL_LITERAL_SAFE))
        value = quote(values.get(match.group(1)) or "", safe="")
        # "." and ".." are unreserved, yet a dot segment would walk the path once normalised.
        parts.append(value.replace(".", "%2E") if value in (".", "..") else value)
        position = match.end()
    parts.append(quote(template[position:], safe=_URL_LITERAL_SAFE))
    return "".join(parts)


def render_json(body_template: Mapping[str, str], values: Mapping[str, str | None]) -> bytes:
    """A JSON object of the body's keys (as written) and rendered values, all JSON strings.

    ASCII only (``\\uXXXX`` escapes), so no text encoding can go wrong. Never raises.
    """
    body = {key: render_text(value, values) for key, value in body_template.items()}
    return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def render_form(body_template: Mapping[str, str], values: Mapping[str, str | None]) -> str:
    """``application/x-www-form-urlencoded`` text of the body's keys and rendered values (also
    fit for a query string). Never raises.
    """
    return urlencode([(key, render_text(value, values)) for key, value in body_template.items()])


def render_header(template: str, values: Mapping[str, str | None]) -> str:
    """A header value with CR, LF and NUL removed from each substituted value, so a client's value
    can never end the header and start another. Never raises.
    """
    return _substitute(template, values, _strip_breaks)


def _client_values(credentials: Credentials) -> dict[str, str]:
    address = credentials.address
    common_name = credentials.cert_common_name
    if common_name is None and address.tls is not None and address.tls.cert_verified:
        # Only a verified certificate's CN: an unverified one is whatever the client wrote.
        common_name = address.tls.cert_cn
    return {
        "clientid": credentials.client_id,
        "username": credentials.username or "",
        "peerhost": address.ip,
        "peerport": str(address.port),
        "proxy_peerhost": address.proxy_ip or "",
        "cert_common_name": common_name or "",
        "listener": credentials.listener_id,
        "proto_ver": str(credentials.proto_ver),
    }


def authentication_values(credentials: Credentials) -> dict[str, str]:
    """The values of :data:`AUTHENTICATION_PLACEHOLDERS` for a CONNECT; absent ones are ``""``.

    Raises:
        UnicodeDecodeError: the password is not UTF-8 text (it cannot be sent in JSON or a form).
    """
    values = _client_values(credentials)
    password = credentials.password
    values["password"] = password.decode("utf-8") if password is not None else ""
    return values


def authorization_values(credentials: Credentials, action: str, topic: str, qos: int) -> dict[str, str]:
    """The values of :data:`AUTHORIZATION_PLACEHOLDERS` for one PUBLISH or SUBSCRIBE.

    Never raises.
    """
    values = _client_values(credentials)
    values.update({"topic": topic, "action": action, "qos": str(qos)})
    return values


def check_settings(settings: HttpRequest, allowed: frozenset[str]) -> list[tuple[str, str]]:
    """What is wrong with the templates of an HTTP callout, as ``(key, message)`` pairs.

    ``key`` is ``url``, ``headers.NAME`` or ``body.KEY`` (the caller prefixes where the settings
    stand). Empty when all is well. Never raises.
    """
    problems: list[tuple[str, str]] = []
    if not settings.url:
        problems.append(("url", "is required (e.g. 'http://127.0.0.1:8080/auth')"))
    else:
        message = check_url_template(settings.url, allowed)
        if message is not None:
            problems.append(("url", message))
    for name, value in settings.headers.items():
        key = f"headers.{name}"
        if "${" in name:
            problems.append((key, "placeholders may stand in header values only, not in names"))
        elif not _HEADER_NAME.match(name):
            problems.append((key, f"{name!r} is not an HTTP header name"))
        if any(c in value for c in "\r\n\0"):
            problems.append((key, "a header value cannot hold CR, LF or NUL"))
        message = check_template(value, allowed)
        if message is not None:
            problems.append((key, message))
    for field, value in settings.body.items():
        key = f"body.{field}"
        if "${" in field:
            problems.append((key, "placeholders may stand in body values only, not in keys"))
        message = check_template(value, allowed)
        if message is not None:
            problems.append((key, message))
    return problems
