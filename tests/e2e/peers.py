"""Real load balancers as processes of the test: NGINX and HAProxy, never touching /etc.

Example configs under ``examples/`` are rendered by replacing the literal addresses they are
written with (the broker at ``127.0.0.1:1883``...) by the test's own; every replacement must
occur, so an example and its test cannot drift apart.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

from tests.support import REPO, WAIT, require_binary, wait_port

EXAMPLES = REPO / "examples"

NGINX_MAIN = """\
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
pid {dir}/nginx.pid;
error_log stderr {log_level};
worker_processes 1;
events {{ worker_connections 1024; }}
{body}
"""

#: Inside ``http {}``: every temp path and log in the test's directory.
NGINX_HTTP_PREAMBLE = """\
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
"""


def free_port() -> int:
    """A port nothing listens on right now on 127.0.0.1 *and* ::1 (peers bind both; the IPv6 one
    can be taken while the IPv4 one is free). The peer binds it next."""
    for _ in range(50):
        with socket.socket(socket.AF_INET) as v4:
            v4.bind(("127.0.0.1", 0))
            port = int(v4.getsockname()[1])
            with socket.socket(socket.AF_INET6) as v6:
                try:
                    v6.bind(("::1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


def render_example(relative: str, replacements: Mapping[str, str]) -> str:
    """The example file with each literal key replaced; fails if a key does not occur."""
    text = (EXAMPLES / relative).read_text()
    for old, new in replacements.items():
        assert old in text, f"examples/{relative} no longer contains {old!r}; update the test with it"
        text = text.replace(old, new)
    return text


class _Process:
    """A peer process whose stderr is collected."""

    def __init__(self, argv: list[str], workdir: Path) -> None:
        self.workdir = workdir
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_listening(self, *addresses: tuple[str, int]) -> None:
        for host, port in addresses:
            try:
                wait_port(host, port, WAIT)
            except AssertionError:
                message = f"{self.__class__.__name__} is not listening on {host}:{port}:\n{self.log()}"
                raise AssertionError(message) from None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.__class__.__name__} exited:\n{self.log()}")

    def log(self) -> str:
        return "\n".join(self.lines[-50:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Nginx(_Process):
    """``nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`` with ``body`` in the main context."""

    def __init__(self, workdir: Path, body: str, log_level: str = "notice") -> None:
        binary = require_binary("nginx")
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_MAIN.format(dir=workdir, log_level=log_level, body=body))
        check = subprocess.run(
            [binary, "-t", "-p", f"{workdir}/", "-c", str(conf)], capture_output=True, text=True
        )
        assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}\n{conf.read_text()}"
        super().__init__([binary, "-p", f"{workdir}/", "-c", str(conf), "-g", "daemon off;"], workdir)


class NginxHttp(Nginx):
    """NGINX with ``servers`` (an example's http-context lines) inside an ``http {}`` block."""

    def __init__(self, workdir: Path, servers: str) -> None:
        super().__init__(workdir, "http {\n" + NGINX_HTTP_PREAMBLE.format(dir=workdir) + servers + "\n}\n")


class HAProxy(_Process):
    """``haproxy -f CFG -db``."""

    def __init__(self, workdir: Path, config: str) -> None:
        binary = require_binary("haproxy")
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(config)
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, f"haproxy -c failed:\n{check.stdout}{check.stderr}\n{config}"
        super().__init__([binary, "-f", str(cfg), "-db"], workdir)
