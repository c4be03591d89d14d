"""Certificates made at test time with the openssl command: a CA, a server and a client certificate."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support import require_binary


@dataclass(frozen=True)
class Pki:
    """Paths of the files made by :func:`make_pki`."""

    directory: Path
    ca: Path  # CA certificate (PEM)
    server_cert: Path  # CN=localhost, SAN localhost, 127.0.0.1, ::1
    server_key: Path
    server_pem: Path  # certificate + key in one file (HAProxy's crt)
    client_cert: Path  # CN=device-42, signed by the CA
    client_key: Path
    rogue_cert: Path  # CN=device-42, self-signed: not verifiable by the CA
    rogue_key: Path

    CLIENT_CN = "device-42"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"openssl {' '.join(args)} failed:\n{result.stderr}"


def make_pki(directory: Path) -> Pki:
    """A fresh CA with a server and a client certificate (EC P-256, valid one day)."""
    require_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=realip test CA",
        cwd=directory,
    )
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject in (("server", "/CN=localhost"), ("client", f"/CN={Pki.CLIENT_CN}")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=directory,
        )  # fmt: skip
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "rogue.key",
        "-out",
        "rogue.pem",
        "-days",
        "1",
        "-subj",
        f"/CN={Pki.CLIENT_CN}",
        cwd=directory,
    )
    (directory / "server-full.pem").write_text(
        (directory / "server.pem").read_text() + (directory / "server.key").read_text()
    )
    return Pki(
        directory=directory,
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        server_pem=directory / "server-full.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        rogue_cert=directory / "rogue.pem",
        rogue_key=directory / "rogue.key",
    )
