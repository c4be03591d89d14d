"""What authentication costs a CONNECT: connections per second with each password backend.

Four realip-broker processes, rounds alternating between them: no authenticator; the built-in
database with argon2id (the default for new passwords) and with PBKDF2-SHA512; a mosquitto
password file written by Debian's ``mosquitto_passwd`` (``$7$``, 101 PBKDF2 iterations, its
default). A client (asyncio, in this process) opens connections with ``CONCURRENCY`` in flight,
each CONNECT (username and password) -> CONNACK 0 -> DISCONNECT. Password hashes are checked in
the broker's two worker threads, so the rate is bounded by the hash's cost, not by the event loop.

    python bench/bench_auth_connect.py [--quick]

(``python bench/run.py --only auth`` runs the same.)
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_connect_rate import run_round  # noqa: E402
from benchlib import ADMIN_SOCKET, PYTHON, REALIP, Broker, Options, Table, add_rate_rows, start_realip  # noqa: E402

#: (connections per round, rounds); full and quick.
SIZES = {False: (300, 3), True: (60, 1)}
#: Below the broker's 64 pending password checks: more would measure refusals (0x88), not checks.
CONCURRENCY = 32
USER, PASSWORD = "bench-user", "bench-password-0123"


def _config(authentication: str) -> str:
    return f"""\
listeners:
  tcp:
    default: {{bind: "127.0.0.1:0"}}
  ws:
    default: {{enable: false}}
admin: {{listen: "unix:{ADMIN_SOCKET}"}}
authentication: {authentication}
"""


def _connect(client_id: bytes) -> bytes:
    """An MQTT 3.1.1 CONNECT with username and password."""

    def string(value: bytes) -> bytes:
        return len(value).to_bytes(2, "big") + value

    body = (
        b"\x00\x04MQTT\x04\xc2\x00\x3c"
        + string(client_id)
        + string(USER.encode())
        + string(PASSWORD.encode())
    )
    return b"\x10" + bytes([len(body)]) + body


async def _add_user(broker: Broker) -> None:
    process = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "broker",
        "ctl",
        "--admin",
        f"unix:{broker.workdir / ADMIN_SOCKET}",
        "users",
        "add",
        USER,
        "--password-stdin",
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={"PYTHONPATH": str(BENCH.parent)},
    )
    await process.communicate(f"{PASSWORD}\n".encode())
    if process.returncode != 0:
        raise RuntimeError(f"{broker.label}: ctl users add failed")


async def _brokers(workdir: Path) -> dict[str, Broker]:
    brokers = {
        "no authenticator": await start_realip(_config("[]"), label=f"{REALIP} (no auth)"),
    }
    for algorithm in ("argon2id", "pbkdf2"):
        entry = (
            "[{mechanism: password_based, backend: built_in_database, "
            f"password_hash_algorithm: {algorithm}}}]"
        )
        broker = await start_realip(_config(entry), label=f"{REALIP} ({algorithm})")
        await _add_user(broker)
        brokers[f"built-in database, {algorithm}"] = broker
    binary = shutil.which("mosquitto_passwd")
    if binary is not None:
        passwd = workdir / "passwd"
        subprocess.run([binary, "-b", "-c", str(passwd), USER, PASSWORD], check=True, capture_output=True)
        entry = f"[{{mechanism: password_based, backend: password_file, path: {str(passwd)!r}}}]"
        brokers["mosquitto password file ($7$, 101 iterations)"] = await start_realip(
            _config(entry), label=f"{REALIP} (password file)"
        )
    return brokers


async def measure(brokers: dict[str, Broker], connections: int, rounds: int) -> Table:
    for broker in brokers.values():  # warm-up
        await run_round(broker.port, None, min(20, connections), CONCURRENCY, broker, _connect)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in brokers}
    names = list(brokers)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            broker = brokers[name]
            results[name].append(
                await run_round(broker.port, None, connections, CONCURRENCY, broker, _connect)
            )
    table = Table(
        f"CONNECT rate by authentication backend ({connections:,} connections x {rounds} rounds, "
        f"{CONCURRENCY} in flight)",
        [
            "authentication",
            "conn/s (median)",
            "per round",
            "ratio to none: median [min-max]",
            "broker CPU",
            "client CPU",
        ],
    )
    add_rate_rows(table, results, results[names[0]])
    table.notes += [
        "Each connection: CONNECT with username and password -> CONNACK 0 -> DISCONNECT. Hashes are "
        "checked in the broker's 2 worker threads (broker CPU up to 200%); argon2id at 19 MiB, 2 "
        "passes, 1 lane; PBKDF2-SHA512 at 210,000 iterations; mosquitto_passwd's $7$ at 101.",
    ]
    return table


async def run(options: Options) -> list[Table]:
    connections, rounds = SIZES[options.quick]
    workdir = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    brokers = await _brokers(workdir)
    try:
        return [await measure(brokers, connections, rounds)]
    finally:
        for broker in brokers.values():
            await broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _standalone(quick: bool) -> None:
    options = Options(quick=quick)
    try:
        for table in await run(options):
            print(table.render())
    finally:
        await options.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    asyncio.run(_standalone(parser.parse_args().quick))
