"""Ways to reach a broker under test: directly, or through a real NGINX (PROXY protocol on TCP,
X-Forwarded-For on WebSocket) whose upstream side is bound to :data:`EDGE`, so that the broker sees
the load balancer's address on the socket and must learn the client's own from NGINX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.peers import Nginx, NginxHttp, free_port, render_example
from tests.support import BrokerProcess

#: The address NGINX connects to the broker from.
EDGE = "127.0.0.50"


@dataclass
class Route:
    broker: BrokerProcess
    port: int
    websocket: bool = False
    #: The address the broker sees as the socket peer (the load balancer, or the client itself).
    proxy: str | None = None


def nginx_proxy(broker: BrokerProcess, tmp_path: Path, listener: str = "tcp:pp") -> tuple[int, Any]:
    """NGINX (stream, ``proxy_protocol on``, bound to :data:`EDGE`) in front of ``listener``."""

    port = free_port()
    body = render_example(
        "nginx/tcp-proxy-protocol.conf",
        {
            "listen 1884;": f"listen 127.0.0.1:{port};",
            "proxy_pass 127.0.0.1:1883;": f"proxy_bind {EDGE};\n        proxy_pass 127.0.0.1:{broker.port(listener)};",
        },
    )
    nginx = Nginx(tmp_path / "nginx", body)
    nginx.wait_listening(("127.0.0.1", port))
    return port, nginx


def nginx_ws(broker: BrokerProcess, tmp_path: Path, listener: str = "ws:xff") -> tuple[int, Any]:
    """NGINX (HTTP, X-Forwarded-For and X-Forwarded-Port, bound to :data:`EDGE`) in front of
    ``listener``."""

    port = free_port()
    body = render_example(
        "nginx/ws-xff.conf",
        {
            "listen 8080;": f"listen 127.0.0.1:{port};",
            "proxy_pass http://127.0.0.1:8083;": (
                f"proxy_bind {EDGE};\n        proxy_pass http://127.0.0.1:{broker.port(listener)};"
            ),
        },
    )
    nginx = NginxHttp(tmp_path / "nginx-ws", body)
    nginx.wait_listening(("127.0.0.1", port))
    return port, nginx
