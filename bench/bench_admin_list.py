"""How long listing 10,000 connected clients takes through the admin API and ``ctl``.

The admin API is served for real (aiohttp on a unix socket); the engine is replaced by a stand-in
holding 10,000 session views, so the figure is the API, JSON and ``ctl`` formatting, not amqtt.

    python bench/bench_admin_list.py [--clients N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.admin import AdminServer
from broker.auth.chain import AuthChain
from broker.engine import SessionView
from broker.metrics import MessageCounters
from broker.settings import AdminAddress, AdminSettings
from listeners.address import AddressSource, ClientAddress


class FakeEngine:
    def __init__(self, count: int) -> None:
        now = time.time()
        self.counters = MessageCounters()
        # What /metrics reads besides the sessions (AdminServer builds its collector from them).
        self.gatekeeper = None
        self.auth = AuthChain()
        self.source_results: Counter[tuple[str, str]] = Counter()
        self._views = [
            SessionView(
                client_id=f"device-{index:05d}",
                username=None,
                address=ClientAddress(
                    f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}",
                    40000 + index % 20000,
                    AddressSource.PROXY_PROTOCOL_V2,
                    proxy_ip="172.16.0.2",
                    proxy_port=30000 + index % 30000,
                ),
                listener_id="tcp:default",
                clean_session=True,
                keepalive=60,
                connected_at=now,
                proto_ver=4,
            )
            for index in range(count)
        ]

    def sessions(self) -> list[SessionView]:
        return self._views

    def count(self) -> int:
        return len(self._views)

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self._views)}


async def main(count: int, rounds: int) -> None:
    workdir = Path(tempfile.mkdtemp())
    socket_path = workdir / "admin.sock"
    server = AdminServer(
        AdminSettings(listen=AdminAddress(path=str(socket_path))),
        FakeEngine(count),  # type: ignore[arg-type]
        [],
        None,  # type: ignore[arg-type]
    )
    await server.start()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "broker", "ctl", "--admin", f"unix:{socket_path}", "clients", "list"]
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, env=env)
        out, _ = await process.communicate()
        timings.append(time.perf_counter() - started)
        assert process.returncode == 0 and out.count(b"\n") == count
    baseline = []
    for _ in range(rounds):
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "--version", stdout=subprocess.PIPE, env=env
        )
        await process.communicate()
        baseline.append(time.perf_counter() - started)
    await server.stop()
    median = sorted(timings)[len(timings) // 2]
    print(f"ctl clients list, {count} clients: best {min(timings):.3f}s, median {median:.3f}s")
    print(f"  of which process start-up (realip-broker --version): best {min(baseline):.3f}s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.clients, 2 if args.quick else 5))
