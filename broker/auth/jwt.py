"""``mechanism: jwt``: a signed token in the password (or username) field, EMQX's JWT authenticator.

The algorithms a token may use are fixed by the configured kind, never read from the token: an
``hmac-based`` authenticator accepts HS256/384/512 only, a ``public-key`` one only the RSA or ECDSA
algorithms that fit its key. So ``alg: none`` is refused, and so is the classic confusion attack (an
HS256 token "signed" with the public key's PEM text used as the HMAC secret), which the amqtt JWT
plugin of 0.12.1 cannot tell apart because it ignores its configured algorithm.

Outcomes, as EMQX's: no token, or something that is not shaped like a JWT, is ``ignore`` (the chain
goes on: a password-based authenticator may own that client); a JWT that fails (signature,
``exp``, ``nbf``, a claim) is ``deny``, with a reason that never quotes the token.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import get_default_algorithms

from broker.auth.base import AuthError, Credentials, Outcome, Verdict

if TYPE_CHECKING:
    from broker.settings import JwtSettings

logger = logging.getLogger(__name__)

#: The only algorithms an ``hmac-based`` authenticator verifies (RFC 7518 section 3.2).
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")

#: What an RSA public key may verify: PKCS#1 v1.5 and PSS signatures (RFC 7518 sections 3.3, 3.5).
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")

#: An ECDSA key verifies the one algorithm of its curve (RFC 7518 section 3.4): accepting the others
#: would only turn a wrong token into a key error instead of a refusal.
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

#: Seconds of clock skew forgiven on ``exp``, ``nbf`` and ``iat``. None, as EMQX (``Now < exp``):
#: a token EMQX refuses is refused here too, so moving a fleet between the two changes nothing, and
#: an expired token stolen from a client buys no extra time. An issuer whose clock runs ahead should
#: not stamp ``nbf`` with its own "now".
LEEWAY_SECONDS = 0

#: The claim that makes the client a superuser when it is ``true`` (JSON true, or the string
#: ``"true"``), the name EMQX reads from JWT claims and HTTP replies. Anything else (``1``, ``"yes"``)
#: is not taken as true: a privilege is granted only when asked for unambiguously.
SUPERUSER_CLAIM = "is_superuser"

#: The placeholders a ``verify_claims`` template may hold (EMQX's allowed variables for JWT).
_PLACEHOLDER = re.compile(r"\$\{(clientid|username)\}")

#: Any ``${...}``, to refuse unknown placeholders (``${clientId}``, ``${peerhost}``) at start-up
#: rather than silently compare a claim with the literal text.
_ANY_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")

#: Three base64url segments, the last one (the signature) possibly empty: the JWS compact form
#: (RFC 7515 section 7.1). An empty signature is kept in so that an ``alg: none`` token is
#: recognised as a JWT, and refused, instead of being passed on to the next authenticator.
_JWS_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

#: PEM text starts like this; anything else in ``public_key`` is the path of a file.
_PEM_PREFIX = "-----BEGIN"

#: Claims PyJWT checks when present; ``aud`` is left to ``verify_claims`` (PyJWT would refuse every
#: token with an ``aud`` when no audience is configured, EMQX checks it only when asked to).
_DECODE_OPTIONS: Any = {"verify_aud": False}


class JwtAuthenticator:
    """Verifies a JWT carried in the CONNECT password (or username) with a fixed key and algorithms."""

    name = "jwt"

    def __init__(self, settings: JwtSettings) -> None:
        self._settings = settings
        #: A token proves the username only when it carries it: as the username field itself, or
        #: in a claim that must equal ``${username}``. Otherwise a token for one device would
        #: let its holder claim any username (and the rules that name it).
        self.proves_username = settings.token_from == "username" or any(  # noqa: S105 - a field name
            "${username}" in template for template in settings.verify_claims.values()
        )
        self._key: Any = None  # bytes (HMAC) or a cryptography public key, set by start()
        self._algorithms: tuple[str, ...] = ()

    async def start(self) -> None:
        """Prepare the key: decode the secret, or read and parse the public key.

        Raises:
            AuthError: the secret is empty or not base64 (when said to be), the public key file
                cannot be read, the key is not an RSA or EC (P-256/384/521) public key, or a
                ``verify_claims`` template holds a placeholder other than ``${clientid}`` and
                ``${username}``. The message names the setting or the file, never the secret.
        """
        for claim, template in self._settings.verify_claims.items():
            for placeholder in _ANY_PLACEHOLDER.findall(template):
                if not _PLACEHOLDER.fullmatch(placeholder):
                    raise AuthError(
                        f"verify_claims.{claim}: unknown placeholder {placeholder} "
                        "(only ${clientid} and ${username} are supported)"
                    )
        if self._settings.algorithm == "hmac-based":
            key: Any = self._hmac_secret()
            algorithms: tuple[str, ...] = HMAC_ALGORITHMS
        else:
            key, algorithms = self._public_key()
        self._check_key(key, algorithms)
        self._key, self._algorithms = key, algorithms

    async def close(self) -> None:
        """Forget the key. Never raises."""
        self._key, self._algorithms = None, ()

    async def authenticate(self, credentials: Credentials) -> Verdict:
        """Verify the token and the claims. Never raises.

        ``ignore``: no token, or not a JWT. ``deny``: a JWT that does not verify or whose claims do
        not match. ``ignore`` with ``error``: not started, or an unexpected failure (logged).
        """
        token = self._token(credentials)
        if token is None:
            return Verdict(Outcome.IGNORE)
        if self._key is None:
            return Verdict(Outcome.IGNORE, reason="jwt authenticator not started", error=True)
        try:
            claims = jwt.decode(
                token,
                key=self._key,
                algorithms=list(self._algorithms),
                options=_DECODE_OPTIONS,
                leeway=LEEWAY_SECONDS,
            )
        except jwt.PyJWTError as exc:
            return Verdict(Outcome.DENY, reason=_refusal(exc))
        except Exception as exc:  # a bug here must not take the CONNECT down: not ours to decide
            # The type only: a message could quote the token.
            logger.warning(
                "jwt: verifying the token of client %r from %s failed: %s",
                credentials.client_id,
                credentials.address.describe(),
                type(exc).__name__,
            )
            return Verdict(
                Outcome.IGNORE, reason=f"jwt verification failed ({type(exc).__name__})", error=True
            )
        for claim, template in self._settings.verify_claims.items():
            if claim not in claims:
                return Verdict(Outcome.DENY, reason=f"claim {claim} is missing")
            expected = _render(template, credentials)
            if expected is None or not _claim_matches(claim, claims[claim], expected):
                return Verdict(Outcome.DENY, reason=f"claim {claim} does not match")
        superuser = claims.get(SUPERUSER_CLAIM)
        return Verdict(Outcome.ALLOW, is_superuser=superuser is True or superuser == "true")

    def _token(self, credentials: Credentials) -> str | None:
        """The JWT the client presents, or None when it presents nothing shaped like one.

        Shaped like one: three base64url segments whose first decodes to a JSON object (a JOSE
        header). Reading the header here only classifies the field; what verifies is fixed by the
        settings. Never raises.
        """
        if self._settings.token_from == "username":  # noqa: S105 (a field's name, not a password)
            text = credentials.username
        elif credentials.password is None:
            text = None
        else:
            try:
                text = credentials.password.decode("ascii")
            except UnicodeDecodeError:
                return None  # a JWT is ASCII: this is some other kind of password
        if not text or not _JWS_SHAPE.fullmatch(text):
            return None
        try:
            jwt.get_unverified_header(text)
        except jwt.PyJWTError:
            return None
        return text

    def _hmac_secret(self) -> bytes:
        """The HMAC key bytes.

        Raises:
            AuthError: empty, or not valid base64 when ``secret_base64_encoded``.
        """
        secret = self._settings.secret
        if not secret:
            raise AuthError("secret is empty (required with algorithm: hmac-based)")
        if not self._settings.secret_base64_encoded:
            return secret.encode("utf-8")
        try:
            key = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raise AuthError("secret is not valid base64 (secret_base64_encoded: true)") from None
        if not key:
            raise AuthError("secret decodes to nothing (secret_base64_encoded: true)")
        return key

    def _public_key(self) -> tuple[Any, tuple[str, ...]]:
        """The public key and the algorithms it may verify.

        Raises:
            AuthError: the file cannot be read, or it (or the inline text) is not an RSA or EC
                public key or certificate.
        """
        value = self._settings.public_key.strip()
        if value.startswith(_PEM_PREFIX):
            where, pem = "public_key", value.encode("utf-8")
        else:
            if not value:
                raise AuthError("public_key is empty (required with algorithm: public-key)")
            where = f"public_key file {value!r}"
            try:
                pem = Path(value).read_bytes()
            except OSError as exc:
                raise AuthError(f"{where} cannot be read: {exc.strerror or exc}") from None
        if b"PRIVATE KEY-----" in pem:
            # Refused rather than derived from: a private key has no business on the broker.
            raise AuthError(f"{where} holds a private key; give the public key (or a certificate)")
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                key: Any = x509.load_pem_x509_certificate(pem).public_key()
            else:
                key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise AuthError(f"{where} is not a PEM public key or certificate") from None
        if isinstance(key, rsa.RSAPublicKey):
            return key, RSA_ALGORITHMS
        if isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = EC_ALGORITHMS.get(key.curve.name)
            if algorithm is None:
                raise AuthError(
                    f"{where}: EC curve {key.curve.name} is not supported (P-256, P-384, P-521 are)"
                )
            return key, (algorithm,)
        raise AuthError(f"{where} is a {type(key).__name__}; an RSA or EC public key is required")

    def _check_key(self, key: Any, algorithms: tuple[str, ...]) -> None:
        """Let PyJWT prepare the key for each algorithm once, so a key it would refuse fails at
        start-up rather than on every CONNECT; warn about keys shorter than recommended (EMQX
        accepts them, so do we).

        Raises:
            AuthError: PyJWT refuses the key (an HMAC secret that looks like a PEM key).
        """
        known = get_default_algorithms()
        warned = False
        for name in algorithms:
            implementation = known[name]
            try:
                prepared = implementation.prepare_key(key)
            except (jwt.InvalidKeyError, TypeError, ValueError) as exc:
                raise AuthError(f"the key cannot be used with {name}: {exc}") from None
            # check_key_length exists in newer PyJWT only.
            check = getattr(implementation, "check_key_length", None)
            message = check(prepared) if check is not None else None
            if message and not warned:
                logger.warning("jwt: weak key: %s", message)
                warned = True


def _render(template: str, credentials: Credentials) -> str | None:
    """``template`` with ``${clientid}`` and ``${username}`` replaced by the client's own, in one pass
    (a username holding ``${clientid}`` stays literal). None when it names a value the client does
    not have: an empty username or client id names nobody, so a token issued for "nobody" must not
    match every anonymous client. Never raises."""
    missing = False

    def value(match: re.Match[str]) -> str:
        nonlocal missing
        found = credentials.client_id if match.group(1) == "clientid" else credentials.username
        if not found:
            missing = True
            return ""
        return found

    rendered = _PLACEHOLDER.sub(value, template)
    return None if missing else rendered


def _claim_matches(claim: str, value: Any, expected: str) -> bool:
    """Whether a token's claim equals the expected text. Only a string equals it (``5`` is not
    ``"5"``, as in EMQX); ``aud`` may also be a list holding it (RFC 7519 section 4.1.3). Never raises."""
    if isinstance(value, str):
        return value == expected
    if claim == "aud" and isinstance(value, list):
        return expected in [item for item in value if isinstance(item, str)]
    return False


def _refusal(exc: jwt.PyJWTError) -> str:
    """The reason of a refused token, from PyJWT's exception: a fixed phrase, never the token or
    anything the client chose. Never raises."""
    # Most specific first: InvalidSignatureError is a DecodeError.
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.InvalidKeyError):
        return "key does not fit the token"
    if isinstance(exc, jwt.DecodeError):
        return "malformed token"
    return f"invalid token ({type(exc).__name__})"
