"""What a long ban list costs a CONNECT: connections per second with 0 and with 10,000 bans.

Two realip-broker processes, rounds alternating between them: one with no bans, one started with
10,000 ``peerhost`` bans in its ``data/bans.json`` (9,000 exact addresses, IPv4 and IPv6, and 1,000
networks of prefix lengths /8 to /31 and /32 to /127), none of which holds the client (127.0.0.1).
Every CONNECT is checked against the list (issue 15: 5,000 bans took the rate from 1,141/s to 81/s
when each CONNECT scanned every ban). A client (asyncio, in this process) opens connections with
``CONCURRENCY`` in flight, each CONNECT -> CONNACK 0 -> DISCONNECT. Before measuring, the banned
broker is checked: it lists 10,000 bans, and refuses a client from a banned address (127.0.0.2).

    python bench/bench_bans.py [--quick]

(``python bench/run.py --only bans`` runs the same.)
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_connect_rate import run_round  # noqa: E402
from benchlib import (  # noqa: E402
    ADMIN_SOCKET,
    REALIP,
    BenchError,
    Broker,
    Options,
    Table,
    add_rate_rows,
    connect_packet,
    median,
    start_realip,
)

#: (connections per round, rounds); full and quick. A full round lasts about half a second: rounds of
#: 750 (bench_connect_rate's count) last under 0.2 s, where scheduling noise swings the ratio most.
SIZES = {False: (2_000, 10), True: (200, 2)}
CONCURRENCY = 50
#: The ban list of issue 15's bound: 10,000 bans cost a CONNECT less than 10% (ratio >= 0.9).
EXACT, NETWORKS = 9_000, 1_000
BOUND = 0.9
#: A banned address on the loopback: a client bound to it must be refused (the list is in force).
BANNED_CLIENT = "127.0.0.2"
#: Fixed seed: the same list every run.
SEED = 15

CONFIG = f"""\
listeners:
  tcp:
    default: {{bind: "127.0.0.1:0"}}
  ws:
    default: {{enable: false}}
admin: {{listen: "unix:{ADMIN_SOCKET}"}}
"""


def ban_list() -> list[dict[str, object]]:
    """10,000 ``peerhost`` bans in the file's form, their values canonical; only :data:`BANNED_CLIENT`
    is on the loopback, and no network holds 127.0.0.0/8."""
    rng = random.Random(SEED)
    loopback = ipaddress.IPv4Network("127.0.0.0/8")
    values = {BANNED_CLIENT}
    while len(values) < EXACT:
        if rng.random() < 0.8:  # most clients are IPv4
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
                rng.getrandbits(32)
            )
            if address in loopback:
                continue
        else:
            address = ipaddress.IPv6Address(0x20010DB8 << 96 | rng.getrandbits(96))
        values.add(str(address))
    networks: set[str] = set()
    while len(networks) < NETWORKS:
        network: ipaddress.IPv4Network | ipaddress.IPv6Network
        if rng.random() < 0.8:
            network = ipaddress.IPv4Network((rng.getrandbits(32), rng.randint(8, 31)), strict=False)
            if network.overlaps(loopback):
                continue
        else:
            network = ipaddress.IPv6Network(
                (0x20010DB8 << 96 | rng.getrandbits(96), rng.randint(32, 127)), strict=False
            )
        networks.add(str(network))
    at = time.time()
    return [
        {"kind": "peerhost", "value": value, "reason": "bench", "by": "bench", "at": at, "until": None}
        for value in [*sorted(values), *sorted(networks)]
    ]


def write_bans(workdir: Path) -> None:
    """``start_realip``'s ``prepare``: the ban list in ``<workdir>/data/bans.json`` (``node.data_dir``
    is ``data``, relative to the broker's working directory)."""
    data = workdir / "data"
    data.mkdir(mode=0o700)
    (data / "bans.json").write_text(json.dumps({"version": 1, "bans": ban_list()}))


async def _listed_bans(broker: Broker) -> int:
    """How many bans the broker lists (``GET /api/v1/banned`` on its admin socket)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(str(broker.workdir / ADMIN_SOCKET)), 5.0
    )
    writer.write(b"GET /api/v1/banned HTTP/1.0\r\nHost: bench\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 10.0)
    writer.close()
    _, _, body = response.partition(b"\r\n\r\n")
    return len(json.loads(body)["data"])


async def _refused_from(broker: Broker, ip: str) -> bool:
    """Whether a CONNECT from ``ip`` (a loopback address) gets no CONNACK 0."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port, local_addr=(ip, 0))
    try:
        writer.write(connect_packet(b"bench-banned"))
        connack = await asyncio.wait_for(reader.read(4), 10.0)
    finally:
        writer.close()
    return connack != b"\x20\x02\x00\x00"


async def _brokers() -> tuple[dict[str, Broker], dict[str, float]]:
    """The two brokers by row name, and the seconds each took from launch to ready."""
    brokers: dict[str, Broker] = {}
    started: dict[str, float] = {}
    for name, label, prepare in (
        ("no bans", f"{REALIP} (no bans)", None),
        (f"{EXACT + NETWORKS:,} peerhost bans", f"{REALIP} ({EXACT + NETWORKS:,} bans)", write_bans),
    ):
        began = time.perf_counter()
        try:
            brokers[name] = await start_realip(CONFIG, label=label, prepare=prepare)
        except BaseException:
            for broker in brokers.values():
                await broker.stop()
            raise
        started[name] = time.perf_counter() - began
    return brokers, started


async def measure(
    brokers: dict[str, Broker], started: dict[str, float], connections: int, rounds: int
) -> tuple[Table, float]:
    """The table, and the median ratio of the banned broker's rate to the other's."""
    names = list(brokers)
    banned = brokers[names[1]]
    listed = await _listed_bans(banned)
    if listed != EXACT + NETWORKS or not await _refused_from(banned, BANNED_CLIENT):
        raise BenchError(
            f"{banned.label}: lists {listed} bans, or admits {BANNED_CLIENT}: the list is not in force"
        )
    for broker in brokers.values():  # warm-up
        await run_round(broker.port, None, min(200, connections), CONCURRENCY, broker)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            broker = brokers[name]
            results[name].append(await run_round(broker.port, None, connections, CONCURRENCY, broker))
    table = Table(
        f"CONNECT rate with a long ban list ({connections:,} connections x {rounds} rounds, "
        f"{CONCURRENCY} in flight)",
        [
            "bans",
            "conn/s (median)",
            "per round",
            "ratio to no bans: median [min-max]",
            "broker CPU",
            "client CPU",
        ],
    )
    add_rate_rows(table, results, results[names[0]])
    ratios = [mine[0] / ref[0] for mine, ref in zip(results[names[1]], results[names[0]], strict=True)]
    table.notes += [
        f"The bans: {EXACT:,} exact addresses (4 in 5 IPv4, the rest IPv6) and {NETWORKS:,} networks "
        "(IPv4 /8-/31, IPv6 /32-/127), in data/bans.json before start; none holds the client, "
        f"127.0.0.1. Checked before measuring: {listed:,} listed, {BANNED_CLIENT} refused.",
        "Each connection: CONNECT -> CONNACK 0 -> DISCONNECT; one asyncio client process (this one). "
        "Ratios are taken within a round, then median [min-max] over rounds. Ban cost = 1 - ratio.",
        "Launch to ready: "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in started.items())
        + " (the longer one includes reading and indexing the list).",
    ]
    return table, median(ratios)


async def run(options: Options) -> list[Table]:
    connections, rounds = SIZES[options.quick]
    brokers, started = await _brokers()
    try:
        table, ratio = await measure(brokers, started, connections, rounds)
    finally:
        for broker in brokers.values():
            await broker.stop()
    options.check(
        f"{EXACT + NETWORKS:,} peerhost bans cost a CONNECT under 10% (issue 15: ratio >= {BOUND})",
        f"ratio to no bans {table.rows[1][3]}",
        ratio >= BOUND,
    )
    return [table]


async def _standalone(quick: bool) -> None:
    options = Options(quick=quick)
    try:
        for table in await run(options):
            print(table.render())
        for criterion, measured, met in options.checks:
            print(f"\n{criterion}: {measured}: {'met' if met else 'NOT met'}")
    finally:
        await options.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    asyncio.run(_standalone(parser.parse_args().quick))
