"""Every example broker config passes ``realip-broker check-config`` and opens exactly the
listeners it names (a file with a ``listeners`` section replaces the default ones: no second,
unprotected port beside the protected one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pki import Pki
from tests.support import REPO

#: example -> the listeners it opens (what its topology needs, and nothing else).
EXPECTED = {
    "cluster/node.yaml": ["tcp:default"],
    "haproxy/tcp-send-proxy-v2.yaml": ["tcp:default"],
    "haproxy/tls-passthrough.yaml": ["ssl:default"],
    "haproxy/tls-termination.yaml": ["tcp:default"],
    "nginx/tcp-proxy-protocol.yaml": ["tcp:default"],
    "nginx/tcp-two-tier.yaml": ["tcp:default"],
    "nginx/ws-leftmost.yaml": ["ws:default"],
    "nginx/ws-proxy-protocol.yaml": ["ws:default"],
    "nginx/ws-walk.yaml": ["ws:default"],
    "nginx/ws-x-real-ip.yaml": ["ws:default"],
    "nginx/ws-xff.yaml": ["ws:default"],
    "nginx/wss-proxy-protocol.yaml": ["wss:default"],
}


def test_every_example_is_listed() -> None:
    found = sorted(str(path.relative_to(REPO / "examples")) for path in (REPO / "examples").rglob("*.yaml"))
    assert found == sorted(EXPECTED)


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_example_passes_check_config_with_only_its_listeners(example: str, pki: Pki, tmp_path: Path) -> None:
    # The certificate paths of the TLS examples point at /etc/realip-broker: use the test PKI's.
    text = (REPO / "examples" / example).read_text()
    text = text.replace("/etc/realip-broker/server.pem", str(pki.server_cert))
    text = text.replace("/etc/realip-broker/server.key", str(pki.server_key))
    config = tmp_path / Path(example).name
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    opened = [
        f"{kind}:{name}"
        for kind, named in effective["listeners"].items()
        for name, options in named.items()
        if options["enable"]
    ]
    assert opened == EXPECTED[example]
