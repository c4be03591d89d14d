"""Tests of :mod:`broker.auth.scram`: the RFC 7677 known-answer vector, full exchanges against
scramp's client (SHA-256 and SHA-512), an independent client for the ``y,,`` gs2 header, unknown users
indistinguishable from wrong passwords, and malformed or hostile input that must only ever raise
:class:`ScramError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from base64 import b64decode, b64encode
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scramp import ScramClient  # type: ignore[import-untyped]

from broker.auth.scram import (
    DEFAULT_ITERATIONS,
    MAX_ITERATIONS,
    MAX_MESSAGE_BYTES,
    MAX_USERNAME_BYTES,
    METHODS,
    SALT_BYTES,
    ScramCredentials,
    ScramError,
    ScramExchange,
    make_credentials,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# RFC 7677 section 3.
RFC_USER = "user"
RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = f"n,,n={RFC_USER},r={RFC_CLIENT_NONCE}".encode()
RFC_SERVER_FIRST = f"r={RFC_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".encode()
RFC_CLIENT_FINAL = f"c=biws,r={RFC_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=".encode()
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


class Store:
    """A user store for one algorithm that records what it was asked."""

    def __init__(self, algorithm: str, users: dict[str, str]) -> None:
        self.credentials = {name: make_credentials(pw, algorithm) for name, pw in users.items()}
        self.asked: list[str] = []

    def __call__(self, username: str) -> ScramCredentials | None:
        self.asked.append(username)
        return self.credentials.get(username)


def store_for(method: str) -> Store:
    return Store(METHODS[method], {"alice": "correct horse", "bob": "battery staple"})


def run_client(
    exchange: ScramExchange, method: str, username: str, password: str
) -> tuple[ScramClient, bytes, bytes]:
    """Drive ``exchange`` with scramp's client up to the client-final-message: (client, server-first,
    client-final)."""
    client = ScramClient([method], username, password)
    server_first = exchange.first(client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    return client, server_first, client.get_client_final().encode()


def parse(message: bytes) -> dict[str, str]:
    return dict(part.split("=", 1) for part in message.decode().split(","))


def started(method: str = "SCRAM-SHA-256") -> tuple[ScramExchange, bytes]:
    """An exchange for alice that has taken a valid client-first, and her valid client-final."""
    exchange = ScramExchange(method, store_for(method))
    _, _, client_final = run_client(exchange, method, "alice", "correct horse")
    return exchange, client_final


def independent_client_final(
    hash_name: str,
    password: str,
    gs2_header: str,
    client_first_bare: str,
    server_first: bytes,
) -> tuple[bytes, bytes]:
    """RFC 5802 section 3, written out without scramp: (client-final-message, expected
    server-final-message)."""
    fields = parse(server_first)
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), b64decode(fields["s"]), int(fields["i"]))
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    without_proof = f"c={b64encode(gs2_header.encode()).decode()},r={fields['r']}"
    auth_message = f"{client_first_bare},{server_first.decode()},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hash_name).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_signature = hmac.new(server_key, auth_message, hash_name).digest()
    return (
        f"{without_proof},p={b64encode(proof).decode()}".encode(),
        b"v=" + b64encode(server_signature),
    )


# --------------------------------------------------------------------------------------------------
# Known answers (RFC 7677 section 3)
# --------------------------------------------------------------------------------------------------


def test_rfc7677_credentials_match_the_rfc_formulas() -> None:
    credentials = make_credentials(RFC_PASSWORD, "sha256", 4096, salt=RFC_SALT)
    salted = hashlib.pbkdf2_hmac("sha256", RFC_PASSWORD.encode(), RFC_SALT, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert credentials.salt == RFC_SALT
    assert credentials.iterations == 4096
    assert credentials.stored_key == hashlib.sha256(client_key).digest()
    assert credentials.server_key == hmac.new(salted, b"Server Key", "sha256").digest()


def test_rfc7677_exchange() -> None:
    credentials = make_credentials(RFC_PASSWORD, "sha256", 4096, salt=RFC_SALT)
    exchange = ScramExchange(
        "SCRAM-SHA-256", {RFC_USER: credentials}.get, _server_nonce=RFC_NONCE[len(RFC_CLIENT_NONCE) :]
    )
    assert exchange.username is None
    assert exchange.first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert exchange.username == RFC_USER
    assert exchange.final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_rfc7677_vector_with_another_password_fails() -> None:
    credentials = make_credentials("pencil2", "sha256", 4096, salt=RFC_SALT)
    exchange = ScramExchange(
        "SCRAM-SHA-256", {RFC_USER: credentials}.get, _server_nonce=RFC_NONCE[len(RFC_CLIENT_NONCE) :]
    )
    exchange.first(RFC_CLIENT_FIRST)
    with pytest.raises(ScramError, match="wrong password or unknown user"):
        exchange.final(RFC_CLIENT_FINAL)


# --------------------------------------------------------------------------------------------------
# Full exchanges with scramp's client
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_right_password_passes_and_client_verifies_server(method: str) -> None:
    store = store_for(method)
    exchange = ScramExchange(method, store)
    client, server_first, client_final = run_client(exchange, method, "alice", "correct horse")
    fields = parse(server_first)
    assert fields["i"] == str(DEFAULT_ITERATIONS)
    assert len(b64decode(fields["s"])) == SALT_BYTES
    server_final = exchange.final(client_final)
    assert server_final.startswith(b"v=")
    client.set_server_final(server_final.decode())  # raises if our signature is wrong
    assert exchange.username == "alice"
    assert store.asked == ["alice"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_iterations_of_the_stored_credentials_are_announced(method: str) -> None:
    credentials = make_credentials("pw", METHODS[method], 5000)
    exchange = ScramExchange(method, {"carol": credentials}.get)
    client, server_first, client_final = run_client(exchange, method, "carol", "pw")
    assert parse(server_first)["i"] == "5000"
    client.set_server_final(exchange.final(client_final).decode())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_wrong_password_fails(method: str) -> None:
    exchange = ScramExchange(method, store_for(method))
    _, _, client_final = run_client(exchange, method, "alice", "wrong horse")
    with pytest.raises(ScramError, match="wrong password or unknown user"):
        exchange.final(client_final)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unknown_user_is_indistinguishable_from_wrong_password(method: str) -> None:
    store = store_for(method)
    wrong = ScramExchange(method, store)
    _, known_first, known_final = run_client(wrong, method, "alice", "wrong horse")
    with pytest.raises(ScramError) as wrong_error:
        wrong.final(known_final)

    salts = set()
    for _ in range(3):
        unknown = ScramExchange(method, store)
        _, unknown_first, unknown_final = run_client(unknown, method, "mallory", "correct horse")
        known_fields, unknown_fields = parse(known_first), parse(unknown_first)
        assert unknown_fields.keys() == known_fields.keys() == {"r", "s", "i"}
        assert len(unknown_fields["r"]) == len(known_fields["r"])
        assert len(b64decode(unknown_fields["s"])) == len(b64decode(known_fields["s"]))
        assert unknown_fields["i"] == known_fields["i"]
        salts.add(unknown_fields["s"])
        assert unknown.username == "mallory"
        with pytest.raises(ScramError) as unknown_error:
            unknown.final(unknown_final)
        assert str(unknown_error.value) == str(wrong_error.value)
        assert type(unknown_error.value) is type(wrong_error.value)
    assert len(salts) == 1, "an unknown user's salt must be the same every time"


def test_fake_salts_differ_by_user_and_algorithm() -> None:
    def salt(method: str, username: str) -> str:
        exchange = ScramExchange(method, lambda name: None)
        return parse(exchange.first(f"n,,n={username},r=abc".encode()))["s"]

    assert salt("SCRAM-SHA-256", "mallory") == salt("SCRAM-SHA-256", "mallory")
    assert salt("SCRAM-SHA-256", "mallory") != salt("SCRAM-SHA-256", "trudy")
    assert salt("SCRAM-SHA-256", "mallory") != salt("SCRAM-SHA-512", "mallory")


def test_unknown_users_get_the_configured_iteration_count() -> None:
    exchange = ScramExchange("SCRAM-SHA-256", lambda name: None, unknown_iterations=100_000)
    assert parse(exchange.first(b"n,,n=mallory,r=abc"))["i"] == "100000"


def test_y_gs2_header_is_accepted() -> None:
    """``y,,``: the client supports channel binding but thinks we do not, which is right."""
    store = store_for("SCRAM-SHA-512")
    exchange = ScramExchange("SCRAM-SHA-512", store)
    bare = "n=bob,r=fyko+d2lbbFgONRv9qkxdawL"
    server_first = exchange.first(f"y,,{bare}".encode())
    client_final, expected = independent_client_final("sha512", "battery staple", "y,,", bare, server_first)
    assert exchange.final(client_final) == expected


def test_username_is_decoded_and_saslprepped() -> None:
    # "=2C" is ",", "=3D" is "=" (RFC 5802 section 5.1); SOFT HYPHEN maps to nothing (RFC 4013 section 3).
    store = Store("sha256", {"a,b=cIX": "pw"})
    exchange = ScramExchange("SCRAM-SHA-256", store)
    client, _, client_final = run_client(exchange, "SCRAM-SHA-256", "a,b=cI\u00adX", "pw")
    assert store.asked == ["a,b=cIX"]
    assert exchange.username == "a,b=cIX"
    client.set_server_final(exchange.final(client_final).decode())


def test_password_is_saslprepped() -> None:
    # NO-BREAK SPACE maps to SPACE (RFC 4013 section 2.1), on both sides.
    store = Store("sha256", {"dave": "two\u00a0words"})
    exchange = ScramExchange("SCRAM-SHA-256", store)
    client, _, client_final = run_client(exchange, "SCRAM-SHA-256", "dave", "two words")
    client.set_server_final(exchange.final(client_final).decode())


# --------------------------------------------------------------------------------------------------
# Malformed, hostile or out-of-turn input
# --------------------------------------------------------------------------------------------------

LONG_NAME = "u" * (MAX_USERNAME_BYTES + 1)

BAD_CLIENT_FIRST = {
    "garbage": b"hello world",
    "empty": b"",
    "no gs2 header": b"n=alice,r=abc",
    "missing nonce": b"n,,n=alice",
    "empty nonce": b"n,,n=alice,r=",
    "missing user": b"n,,r=abc",
    "empty user": b"n,,n=,r=abc",
    "attributes swapped": b"n,,r=abc,n=alice",
    "bad escape": b"n,,n=al=ice,r=abc",
    "bad gs2 flag": b"x,,n=alice,r=abc",
    "authzid": b"n,a=admin,n=alice,r=abc",
    "mandatory extension": b"n,,m=ext,n=alice,r=abc",
    "channel binding requested": b"p=tls-unique,,n=alice,r=abc",
    "channel binding unknown type": b"p=tls-exporter,,n=alice,r=abc",
    "channel binding bad type": b"p=t\xc3\xa9,,n=alice,r=abc",
    "nonce with a comma-free bad char": b"n,,n=alice,r=a\x7fb",
    "saslprep prohibited user": "n,,n=al\u0007ice,r=abc".encode(),
    "not utf-8": b"n,,n=\xff\xfe,r=abc",
    "lone surrogate bytes": b"n,,n=\xed\xa0\x80,r=abc",
    "oversize": b"n,,n=alice,r=" + b"a" * MAX_MESSAGE_BYTES,
    "username too long": f"n,,n={LONG_NAME},r=abc".encode(),
}


@pytest.mark.parametrize("message", BAD_CLIENT_FIRST.values(), ids=BAD_CLIENT_FIRST.keys())
def test_malformed_client_first_is_refused(message: bytes) -> None:
    exchange = ScramExchange("SCRAM-SHA-256", store_for("SCRAM-SHA-256"))
    with pytest.raises(ScramError):
        exchange.first(message)
    # The exchange is over: not even a valid message is taken now.
    with pytest.raises(ScramError, match="out of turn"):
        exchange.first(b"n,,n=alice,r=abc")


def test_channel_binding_refusal_says_so() -> None:
    exchange = ScramExchange("SCRAM-SHA-256", store_for("SCRAM-SHA-256"))
    with pytest.raises(ScramError, match="channel binding is not offered"):
        exchange.first(b"p=tls-server-end-point,,n=alice,r=abc")


def test_too_long_username_is_not_looked_up() -> None:
    store = store_for("SCRAM-SHA-256")
    exchange = ScramExchange("SCRAM-SHA-256", store)
    with pytest.raises(ScramError, match="user name longer"):
        exchange.first(f"n,,n={LONG_NAME},r=abc".encode())
    assert store.asked == []
    assert exchange.username is None


def test_longest_username_is_accepted() -> None:
    name = "u" * MAX_USERNAME_BYTES
    exchange = ScramExchange("SCRAM-SHA-256", lambda username: None)
    exchange.first(f"n,,n={name},r=abc".encode())
    assert exchange.username == name


def _bad_client_finals(valid: bytes) -> dict[str, bytes]:
    fields = parse(valid)
    c, r, p = fields["c"], fields["r"], fields["p"]
    return {
        "garbage": b"hello world",
        "empty": b"",
        "missing nonce": f"c={c},p={p}".encode(),
        "missing proof": f"c={c},r={r}".encode(),
        "missing channel binding": f"r={r},p={p}".encode(),
        "wrong nonce": f"c={c},r={r}x,p={p}".encode(),
        "client nonce only": f"c={c},r={r[:10]},p={p}".encode(),
        "channel binding of y": f"c=eSws,r={r},p={p}".encode(),
        "channel binding requested": f"c={b64encode(b'p=tls-unique,,x').decode()},r={r},p={p}".encode(),
        "channel binding not base64": f"c=*,r={r},p={p}".encode(),
        "proof not base64": f"c={c},r={r},p=***".encode(),
        "proof too short": f"c={c},r={r},p={b64encode(b'short').decode()}".encode(),
        "proof flipped": f"c={c},r={r},p={b64encode(bytes(b ^ 1 for b in b64decode(p))).decode()}".encode(),
        "not utf-8": valid[:-4] + b"\xff\xfe\xfd\xfc",
        "oversize": valid + b"," + b"x=" + b"a" * MAX_MESSAGE_BYTES,
    }


_BAD_FINAL_IDS = sorted(_bad_client_finals(b"c=biws,r=abc,p=cHJvb2Y=").keys())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("case", _BAD_FINAL_IDS)
def test_malformed_client_final_is_refused(method: str, case: str) -> None:
    exchange, valid = started(method)
    with pytest.raises(ScramError):
        exchange.final(_bad_client_finals(valid)[case])
    # The exchange is over: not even the valid proof is taken now.
    with pytest.raises(ScramError, match="out of turn"):
        exchange.final(valid)


def test_out_of_turn_messages() -> None:
    exchange = ScramExchange("SCRAM-SHA-256", store_for("SCRAM-SHA-256"))
    with pytest.raises(ScramError, match="out of turn"):
        exchange.final(b"c=biws,r=abc,p=cHJvb2Y=")

    exchange, valid = started()
    with pytest.raises(ScramError, match="out of turn"):
        exchange.first(b"n,,n=alice,r=abc")

    exchange, valid = started()
    exchange.final(valid)
    with pytest.raises(ScramError, match="out of turn"):
        exchange.final(valid)


@FAST
@given(st.binary(max_size=MAX_MESSAGE_BYTES + 16))
def test_random_client_first_raises_only_scram_error(data: bytes) -> None:
    exchange = ScramExchange("SCRAM-SHA-256", store_for("SCRAM-SHA-256"))
    with contextlib.suppress(ScramError):
        exchange.first(data)


# Text built from the characters SCRAM's grammar cares about, so that the parser gets past its
# first checks far more often than with random bytes.
_SCRAM_TEXT = st.lists(
    st.sampled_from(["n", "y", "p", "a", "r", "c", "m", "x", ",", "=", "=2C", "=3D", "==", "abc", "\u00ad"])
    | st.characters(),
    max_size=40,
).map("".join)


@FAST
@given(_SCRAM_TEXT)
def test_random_scram_like_client_first_raises_only_scram_error(text: str) -> None:
    for candidate in (text, f"n,,{text}", f"n,,n=x,r={text}"):
        with contextlib.suppress(ScramError):
            ScramExchange("SCRAM-SHA-256", lambda username: None).first(candidate.encode("utf-8", "replace"))


@FAST
@given(st.binary(max_size=MAX_MESSAGE_BYTES + 16))
def test_random_client_final_raises_scram_error(data: bytes) -> None:
    exchange = ScramExchange("SCRAM-SHA-256", lambda username: None, _server_nonce="fixed")
    exchange.first(b"n,,n=mallory,r=abc")
    with pytest.raises(ScramError):
        exchange.final(data)


@FAST
@given(_SCRAM_TEXT)
def test_random_scram_like_client_final_raises_scram_error(text: str) -> None:
    for candidate in (text, f"c=biws,r=abcfixed,p={text}", f"c=biws,r={text}", f"c={text},r=abcfixed,p=AA=="):
        exchange = ScramExchange("SCRAM-SHA-256", lambda username: None, _server_nonce="fixed")
        exchange.first(b"n,,n=mallory,r=abc")
        with pytest.raises(ScramError):
            exchange.final(candidate.encode("utf-8", "replace"))


# --------------------------------------------------------------------------------------------------
# Set-up errors, credentials, the user store failing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["SCRAM-SHA-1", "SCRAM-SHA-256-PLUS", "scram-sha-256", "PLAIN", ""])
def test_unknown_method_is_a_value_error(method: str) -> None:
    with pytest.raises(ValueError, match="unknown SCRAM method"):
        ScramExchange(method, lambda username: None)


@pytest.mark.parametrize("iterations", [4095, MAX_ITERATIONS + 1, True])
def test_unknown_iterations_out_of_range(iterations: int) -> None:
    with pytest.raises(ValueError, match="unknown_iterations"):
        ScramExchange("SCRAM-SHA-256", lambda username: None, unknown_iterations=iterations)


def test_invalid_test_nonce_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nonce"):
        ScramExchange("SCRAM-SHA-256", lambda username: None, _server_nonce="a,b")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithm": "sha1"}, "unknown SCRAM algorithm"),
        ({"iterations": 4095}, "iteration count"),
        ({"iterations": MAX_ITERATIONS + 1}, "iteration count"),
        ({"salt": b"short"}, "salt"),
        ({"password": "bell\u0007"}, "password cannot be used"),
    ],
)
def test_make_credentials_refuses(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {"password": "pw", "algorithm": "sha256", **kwargs}
    with pytest.raises(ValueError, match=match):
        make_credentials(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(("algorithm", "size"), [("sha256", 32), ("sha512", 64)])
def test_make_credentials_shape(algorithm: str, size: int) -> None:
    first = make_credentials("pw", algorithm)
    second = make_credentials("pw", algorithm)
    assert len(first.salt) == SALT_BYTES
    assert first.salt != second.salt, "every password gets a fresh salt"
    assert len(first.stored_key) == len(first.server_key) == size
    assert first.iterations == DEFAULT_ITERATIONS


def test_credentials_repr_hides_the_keys() -> None:
    credentials = make_credentials("pw", "sha256")
    text = repr(credentials)
    assert credentials.stored_key.hex() not in text
    assert repr(credentials.stored_key) not in text
    assert repr(credentials.server_key) not in text


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"salt": b"short"}, ValueError),
        ({"iterations": 100}, ValueError),
        ({"iterations": 4096.0}, TypeError),
        ({"stored_key": b"x" * 20}, ValueError),
        ({"server_key": b"x" * 64}, ValueError),
        ({"salt": "not bytes"}, TypeError),
    ],
)
def test_credentials_are_validated(changes: dict[str, object], error: type[Exception]) -> None:
    fields: dict[str, object] = {
        "salt": b"s" * 16,
        "iterations": 4096,
        "stored_key": b"k" * 32,
        "server_key": b"k" * 32,
        **changes,
    }
    with pytest.raises(error):
        ScramCredentials(**fields)  # type: ignore[arg-type]


def test_lookup_failure_propagates_unchanged() -> None:
    class StoreDown(Exception):
        pass

    def lookup(username: str) -> ScramCredentials | None:
        raise StoreDown(username)

    exchange = ScramExchange("SCRAM-SHA-256", lookup)
    with pytest.raises(StoreDown):
        exchange.first(b"n,,n=alice,r=abc")
    with pytest.raises(ScramError, match="out of turn"):
        exchange.final(b"c=biws,r=abc,p=cHJvb2Y=")


def test_credentials_of_the_other_algorithm_are_a_wiring_error() -> None:
    lookup: Callable[[str], ScramCredentials | None] = {"alice": make_credentials("pw", "sha256")}.get
    exchange = ScramExchange("SCRAM-SHA-512", lookup)
    with pytest.raises(ValueError, match="not sha512 credentials"):
        exchange.first(b"n,,n=alice,r=abc")
