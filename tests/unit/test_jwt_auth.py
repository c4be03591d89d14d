"""The JWT authenticator (broker/auth/jwt.py): real tokens signed with PyJWT and keys made here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.auth.base import AuthError, Credentials, Outcome, Verdict
from broker.auth.jwt import JwtAuthenticator
from broker.settings import JwtSettings
from listeners.address import ClientAddress

SECRET = "a-test-secret-that-is-long-enough-for-hs512-and-then-some-more-bytes-of-it"
OTHER_SECRET = "another-secret-of-the-same-length-but-not-the-right-one-at-all-no-no-no"
ADDRESS = ClientAddress.direct("192.0.2.10", 50000)


def credentials(
    password: bytes | str | None, *, client_id: str = "dev-1", username: str | None = "alice"
) -> Credentials:
    raw = password.encode() if isinstance(password, str) else password
    return Credentials(
        client_id=client_id,
        username=username,
        password=raw,
        address=ADDRESS,
        listener_id="tcp:default",
        proto_ver=5,
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """Header and claims segments, without the signature."""
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"


def private_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def public_pem(key: Any) -> str:
    return str(
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def started(**settings: Any) -> JwtAuthenticator:
    authenticator = JwtAuthenticator(JwtSettings(**settings))
    await authenticator.start()
    return authenticator


async def check(authenticator: JwtAuthenticator, creds: Credentials) -> Verdict:
    verdict = await authenticator.authenticate(creds)
    if creds.password:
        assert creds.password.decode(errors="replace") not in verdict.reason  # never the token
    return verdict


def hs(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return pyjwt.encode(claims, secret, algorithm=algorithm)


# --- HMAC ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
async def test_hmac_right_token_allows(algorithm: str) -> None:
    authenticator = await started(secret=SECRET)
    verdict = await check(authenticator, credentials(hs({"sub": "alice"}, algorithm=algorithm)))
    assert verdict == Verdict(Outcome.ALLOW)


async def test_hmac_forged_token_denied() -> None:
    authenticator = await started(secret=SECRET)
    verdict = await check(authenticator, credentials(hs({"sub": "alice"}, secret=OTHER_SECRET)))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "bad signature")


async def test_tampered_claims_denied() -> None:
    authenticator = await started(secret=SECRET)
    header, _, signature = hs({"is_superuser": False}).split(".")
    forged = f"{header}.{b64url(json.dumps({'is_superuser': True}).encode())}.{signature}"
    verdict = await check(authenticator, credentials(forged))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "bad signature")


async def test_expired_token_denied() -> None:
    authenticator = await started(secret=SECRET)
    verdict = await check(authenticator, credentials(hs({"exp": int(time.time()) - 1})))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "token expired")


async def test_unexpired_token_allowed() -> None:
    authenticator = await started(secret=SECRET)
    verdict = await check(authenticator, credentials(hs({"exp": int(time.time()) + 60})))
    assert verdict.outcome is Outcome.ALLOW


async def test_not_yet_valid_token_denied() -> None:
    authenticator = await started(secret=SECRET)
    verdict = await check(authenticator, credentials(hs({"nbf": int(time.time()) + 60})))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "token not yet valid")


async def test_non_numeric_exp_is_malformed() -> None:
    authenticator = await started(secret=SECRET)
    verdict = await check(authenticator, credentials(hs({"exp": "tomorrow"})))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "malformed token")


async def test_malformed_payload_denied() -> None:
    authenticator = await started(secret=SECRET)
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64url(b'not json')}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    verdict = await check(authenticator, credentials(f"{signing_input}.{b64url(signature)}"))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "malformed token")


async def test_base64_encoded_secret() -> None:
    raw = bytes(range(64))
    authenticator = await started(secret=base64.b64encode(raw).decode(), secret_base64_encoded=True)
    token = pyjwt.encode({"sub": "alice"}, raw, algorithm="HS256")
    assert (await check(authenticator, credentials(token))).outcome is Outcome.ALLOW
    # The base64 text itself is not the key.
    token = pyjwt.encode({"sub": "alice"}, base64.b64encode(raw), algorithm="HS256")
    assert (await check(authenticator, credentials(token))).outcome is Outcome.DENY


# --- algorithms fixed by the configuration, never by the token -------------------------------


async def test_alg_none_denied_by_hmac_authenticator() -> None:
    authenticator = await started(secret=SECRET)
    token = unsigned({"alg": "none", "typ": "JWT"}, {"sub": "alice", "is_superuser": True}) + "."
    verdict = await check(authenticator, credentials(token))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "algorithm not allowed")


async def test_alg_none_denied_by_public_key_authenticator(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = await started(algorithm="public-key", public_key=public_pem(rsa_key))
    token = unsigned({"alg": "none"}, {"sub": "alice"}) + "."
    verdict = await check(authenticator, credentials(token))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "algorithm not allowed")


async def test_missing_alg_denied() -> None:
    authenticator = await started(secret=SECRET)
    signing_input = unsigned({"typ": "JWT"}, {"sub": "alice"})
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    verdict = await check(authenticator, credentials(f"{signing_input}.{b64url(signature)}"))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "algorithm not allowed")


@pytest.mark.parametrize("as_file", [False, True], ids=["pem-text", "file"])
async def test_hmac_with_public_key_confusion_denied(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path, as_file: bool
) -> None:
    """The classic attack: an HS256 token whose HMAC secret is the server's public key PEM."""
    pem = public_pem(rsa_key)
    path = tmp_path / "public.pem"
    path.write_text(pem)
    authenticator = await started(algorithm="public-key", public_key=str(path) if as_file else pem)
    for secret in (pem.encode(), pem.strip().encode()):
        signing_input = unsigned({"alg": "HS256", "typ": "JWT"}, {"sub": "alice", "is_superuser": True})
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        verdict = await check(authenticator, credentials(f"{signing_input}.{b64url(signature)}"))
        assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "algorithm not allowed")


async def test_hmac_authenticator_refuses_rsa_token(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = await started(secret=SECRET)
    token = pyjwt.encode({"sub": "alice"}, private_pem(rsa_key), algorithm="RS256")
    verdict = await check(authenticator, credentials(token))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "algorithm not allowed")


# --- public keys -------------------------------------------------------------------------------


@pytest.fixture
def key_as(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Turn a private key into the ``public_key`` setting: PEM text, or a file path."""

    def setting(key: Any) -> str:
        pem = public_pem(key)
        if request.param == "pem-text":
            return pem
        path = tmp_path / "jwt_public.pem"
        path.write_text(pem)
        return str(path)

    yield setting


@pytest.mark.parametrize("key_as", ["pem-text", "file"], indirect=True)
@pytest.mark.parametrize("algorithm", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
async def test_rsa_tokens(rsa_key: rsa.RSAPrivateKey, key_as: Any, algorithm: str) -> None:
    authenticator = await started(algorithm="public-key", public_key=key_as(rsa_key))
    token = pyjwt.encode({"sub": "alice"}, private_pem(rsa_key), algorithm=algorithm)
    assert (await check(authenticator, credentials(token))).outcome is Outcome.ALLOW


@pytest.mark.parametrize("key_as", ["pem-text", "file"], indirect=True)
async def test_ec_tokens(ec_key: ec.EllipticCurvePrivateKey, key_as: Any) -> None:
    authenticator = await started(algorithm="public-key", public_key=key_as(ec_key))
    token = pyjwt.encode({"sub": "alice"}, private_pem(ec_key), algorithm="ES256")
    assert (await check(authenticator, credentials(token))).outcome is Outcome.ALLOW


@pytest.mark.parametrize(("curve", "algorithm"), [(ec.SECP384R1(), "ES384"), (ec.SECP521R1(), "ES512")])
async def test_ec_curves(curve: ec.EllipticCurve, algorithm: str) -> None:
    key = ec.generate_private_key(curve)
    authenticator = await started(algorithm="public-key", public_key=public_pem(key))
    token = pyjwt.encode({"sub": "alice"}, private_pem(key), algorithm=algorithm)
    assert (await check(authenticator, credentials(token))).outcome is Outcome.ALLOW


async def test_token_signed_by_another_key_denied(rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = await started(algorithm="public-key", public_key=public_pem(rsa_key))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = pyjwt.encode({"sub": "alice"}, private_pem(other), algorithm="RS256")
    verdict = await check(authenticator, credentials(token))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "bad signature")


async def test_ec_key_refuses_other_families(
    ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    authenticator = await started(algorithm="public-key", public_key=public_pem(ec_key))
    rs = pyjwt.encode({"sub": "alice"}, private_pem(rsa_key), algorithm="RS256")
    p384 = ec.generate_private_key(ec.SECP384R1())
    es384 = pyjwt.encode({"sub": "alice"}, private_pem(p384), algorithm="ES384")
    for token in (rs, es384):
        verdict = await check(authenticator, credentials(token))
        assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "algorithm not allowed")


async def test_public_key_from_certificate(ec_key: ec.EllipticCurvePrivateKey, tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwt issuer")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ec_key, hashes.SHA256())
    )
    path = tmp_path / "issuer.crt"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    authenticator = await started(algorithm="public-key", public_key=str(path))
    token = pyjwt.encode({"sub": "alice"}, private_pem(ec_key), algorithm="ES256")
    assert (await check(authenticator, credentials(token))).outcome is Outcome.ALLOW


# --- start() errors ---------------------------------------------------------------------------


async def test_missing_key_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "jwt.pem"
    with pytest.raises(AuthError, match=str(missing)):
        await started(algorithm="public-key", public_key=str(missing))


async def test_invalid_key_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_text("-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n")
    with pytest.raises(AuthError, match=r"garbage\.pem.*not a PEM public key"):
        await started(algorithm="public-key", public_key=str(path))


async def test_invalid_inline_key() -> None:
    with pytest.raises(AuthError, match="not a PEM public key"):
        await started(algorithm="public-key", public_key="-----BEGIN PUBLIC KEY-----\nnope\n")


async def test_private_key_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(AuthError, match="private key"):
        await started(algorithm="public-key", public_key=private_pem(rsa_key).decode())


async def test_bad_base64_secret() -> None:
    with pytest.raises(AuthError, match="not valid base64"):
        await started(secret="not base64!", secret_base64_encoded=True)


async def test_unknown_placeholder_refused() -> None:
    with pytest.raises(AuthError, match=r"verify_claims\.sub.*\$\{clientId\}"):
        await started(secret=SECRET, verify_claims={"sub": "${clientId}"})


async def test_not_started_is_an_error() -> None:
    authenticator = JwtAuthenticator(JwtSettings(secret=SECRET))
    verdict = await authenticator.authenticate(credentials(hs({})))
    assert (verdict.outcome, verdict.error) == (Outcome.IGNORE, True)


async def test_closed_is_an_error() -> None:
    authenticator = await started(secret=SECRET)
    await authenticator.close()
    verdict = await authenticator.authenticate(credentials(hs({})))
    assert (verdict.outcome, verdict.error) == (Outcome.IGNORE, True)


# --- verify_claims --------------------------------------------------------------------------

CLAIMS = {"sub": "${username}", "cid": "${clientid}", "scope": "dev/${clientid}/${username}"}


async def test_claims_match() -> None:
    authenticator = await started(secret=SECRET, verify_claims=CLAIMS)
    token = hs({"sub": "alice", "cid": "dev-1", "scope": "dev/dev-1/alice"})
    assert (await check(authenticator, credentials(token))).outcome is Outcome.ALLOW


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"sub": "bob", "cid": "dev-1", "scope": "dev/dev-1/alice"}, "claim sub does not match"),
        ({"sub": "alice", "cid": "dev-2", "scope": "dev/dev-1/alice"}, "claim cid does not match"),
        ({"sub": "alice", "cid": "dev-1", "scope": "dev/dev-1/bob"}, "claim scope does not match"),
        ({"sub": "alice", "scope": "dev/dev-1/alice"}, "claim cid is missing"),
        ({"sub": "alice", "cid": ["dev-1"], "scope": "dev/dev-1/alice"}, "claim cid does not match"),
        ({"sub": "alice", "cid": 1, "scope": "dev/dev-1/alice"}, "claim cid does not match"),
        (
            {"sub": ["alice"], "cid": "dev-1", "scope": "dev/dev-1/alice"},
            "invalid token (InvalidSubjectError)",
        ),
    ],
)
async def test_claims_mismatch(claims: dict[str, Any], reason: str) -> None:
    authenticator = await started(secret=SECRET, verify_claims=CLAIMS)
    verdict = await check(authenticator, credentials(hs(claims)))
    assert (verdict.outcome, verdict.reason) == (Outcome.DENY, reason)


@pytest.mark.parametrize("username", [None, ""])
async def test_client_without_username_never_matches(username: str | None) -> None:
    authenticator = await started(secret=SECRET, verify_claims={"sub": "${username}"})
    for claim in ("", "${username}", "alice"):
        verdict = await check(authenticator, credentials(hs({"sub": claim}), username=username))
        assert (verdict.outcome, verdict.reason) == (Outcome.DENY, "claim sub does not match")


async def test_placeholders_substituted_in_one_pass() -> None:
    """A username that holds ``${clientid}`` is compared as those very characters."""
    authenticator = await started(secret=SECRET, verify_claims={"sub": "${username}"})
    creds = credentials(hs({"sub": "${clientid}"}), username="${clientid}")
    assert (await check(authenticator, creds)).outcome is Outcome.ALLOW
    creds = credentials(hs({"sub": "dev-1"}), username="${clientid}")
    assert (await check(authenticator, creds)).outcome is Outcome.DENY


async def test_literal_claim() -> None:
    authenticator = await started(secret=SECRET, verify_claims={"iss": "https://issuer.example"})
    assert (
        await check(authenticator, credentials(hs({"iss": "https://issuer.example"})))
    ).outcome is Outcome.ALLOW
    assert (
        await check(authenticator, credentials(hs({"iss": "https://evil.example"})))
    ).outcome is Outcome.DENY


async def test_aud_claim_may_be_a_list() -> None:
    authenticator = await started(secret=SECRET, verify_claims={"aud": "mqtt"})
    assert (await check(authenticator, credentials(hs({"aud": ["web", "mqtt"]})))).outcome is Outcome.ALLOW
    assert (await check(authenticator, credentials(hs({"aud": "mqtt"})))).outcome is Outcome.ALLOW
    assert (await check(authenticator, credentials(hs({"aud": ["web"]})))).outcome is Outcome.DENY


async def test_aud_not_checked_unless_configured() -> None:
    authenticator = await started(secret=SECRET)
    assert (await check(authenticator, credentials(hs({"aud": "someone-else"})))).outcome is Outcome.ALLOW


# --- where the token is, and what is not one ---------------------------------------------------


@pytest.mark.parametrize(
    "password",
    [None, b"", b"hunter2", b"my.pass.word", b"a.b.c", b"\xff\xfe.binary", b"eyJhbGciOiJIUzI1NiJ9.e30"],
    ids=["none", "empty", "plain", "dotted", "three-dots", "binary", "two-segments"],
)
async def test_not_a_jwt_is_ignored(password: bytes | None) -> None:
    authenticator = await started(secret=SECRET)
    verdict = await check(authenticator, credentials(password))
    assert verdict == Verdict(Outcome.IGNORE)


async def test_token_from_username() -> None:
    authenticator = await started(secret=SECRET, token_from="username")
    token = hs({"sub": "x"})
    assert (await check(authenticator, credentials(None, username=token))).outcome is Outcome.ALLOW
    # The password is not looked at.
    assert (await check(authenticator, credentials(token, username="alice"))) == Verdict(Outcome.IGNORE)
    assert (await check(authenticator, credentials(token, username=None))) == Verdict(Outcome.IGNORE)


# --- superuser --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "superuser"),
    [(True, True), ("true", True), (False, False), (1, False), ("yes", False), (None, False)],
)
async def test_superuser_claim(value: Any, superuser: bool) -> None:
    authenticator = await started(secret=SECRET)
    verdict = await check(authenticator, credentials(hs({"is_superuser": value})))
    assert verdict == Verdict(Outcome.ALLOW, is_superuser=superuser)


async def test_no_superuser_claim() -> None:
    authenticator = await started(secret=SECRET)
    verdict = await check(authenticator, credentials(hs({"sub": "alice"})))
    assert verdict.is_superuser is False
