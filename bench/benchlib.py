"""What the benchmarks share: the three brokers as subprocesses, raw MQTT packets, tables.

Brokers (each its own process, so the benchmark's clients never share its CPU time):

- realip-broker: ``python -m broker serve --config FILE --log-level info`` (the default level) in a
  temporary working directory; ready when it logs ``realip-broker ready: ...``.
- amqtt 0.12.1 with its own TCP listener: ``bench/amqtt_plain.py PORT``.
- mosquitto (Debian's 2.0.11), the C reference: ``/usr/sbin/mosquitto -c CONF``.

All traffic is to 127.0.0.1. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # the project's packages (listeners.proxy_protocol...)
MOSQUITTO = "/usr/sbin/mosquitto"
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

REALIP = "realip-broker"
#: realip-broker on uvloop (``serve --loop uvloop``), the side-by-side loop contender; REALIP runs the
#: default (``serve`` without ``--loop``: asyncio's own event loop). uvloop is not a dependency of the
#: broker (the project's dev extras install it): without it this contender is skipped.
REALIP_UVLOOP = "realip-broker --loop uvloop"
AMQTT = "amqtt 0.12.1"
MOSQ = "mosquitto 2.0.11"

#: The realip-broker source tree the benchmarks run (``run.py --realip-src DIR``: e.g. another commit
#: exported with ``git archive``, to compare before/after a change in the same run's conditions).
REALIP_SRC = [REPO]

#: Seconds a broker gets to start before the benchmark gives up.
START_TIMEOUT = 20.0


class BenchError(RuntimeError):
    """A benchmark could not run (a broker did not start, a peer is missing...)."""


# --------------------------------------------------------------------------------------------------
# Limits and machine facts


def raise_nofile(wanted: int = 20_000) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (capped by the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_summary() -> str:
    mem = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) // 1024 // 1024 + 1} GiB RAM"
    distro = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = ", " + line.partition("=")[2].strip('"')
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}{mem}{distro}, "
        f"Python {platform.python_version()}, kernel {platform.release()}"
    )


def peer_versions() -> str:
    import amqtt

    mosq = "missing"
    if Path(MOSQUITTO).exists():
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False).stdout
        match = re.search(r"version (\S+)", out)
        mosq = match.group(1) if match else "?"
    return f"amqtt {amqtt.__version__}, mosquitto {mosq}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def source_summary() -> str:
    """Which realip-broker is measured: the source tree, its git commit and whether it is modified."""
    src = REALIP_SRC[0]
    if src != REPO:
        return f"{src} (--realip-src)"
    head = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "broker", "listeners"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{REPO} at {head or 'unknown commit'}" + (
        f" + uncommitted changes in {len(dirty.splitlines())} file(s) of broker/ listeners/" if dirty else ""
    )


def require_peers() -> None:
    missing = [name for name in (MOSQUITTO, "mosquitto_pub", "mosquitto_sub") if shutil.which(name) is None]
    if missing:
        raise BenchError(
            f"missing {', '.join(missing)}: install the Debian packages mosquitto mosquitto-clients "
            "(make peers)"
        )


def uvloop_available() -> bool:
    """Whether uvloop is importable by the interpreter the brokers run on (this one)."""
    return importlib.util.find_spec("uvloop") is not None


#: What the benchmarks say where the ``--loop uvloop`` contender is skipped.
UVLOOP_MISSING = (
    f"'{REALIP_UVLOOP}' skipped: uvloop is not importable here (it is in the dev extras: "
    "pip install -e '.[dev]', or pip install uvloop)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# Brokers


@dataclass
class Broker:
    """A broker process of the benchmark."""

    label: str
    kind: str  # "realip" | "amqtt" | "mosquitto"
    process: asyncio.subprocess.Process
    ports: dict[str, int]
    workdir: Path
    log: Path
    #: realip-broker's event loop as it logged it ("uvloop" / "asyncio"); "" for the others.
    loop: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        """The plain MQTT/TCP port."""
        return self.ports["tcp"]

    def rss_kb(self) -> int:
        """Resident set size (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchError(f"{self.label}: no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    async def dropped(self) -> dict[str, int] | None:
        """realip-broker's ``realip_messages_dropped_total`` by reason (from ``/metrics`` on its admin
        socket), or None for another broker or a realip-broker without an admin socket."""
        socket_path = self.workdir / ADMIN_SOCKET
        if self.kind != "realip" or not socket_path.exists():
            return None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket_path)), 5.0)
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            text = (await asyncio.wait_for(reader.read(), 5.0)).decode(errors="replace")
            writer.close()
        except (OSError, TimeoutError):
            return None
        drops: dict[str, int] = {}
        for match in re.finditer(r'^realip_messages_dropped_total\{reason="([^"]*)"\} (\S+)$', text, re.M):
            drops[match.group(1)] = int(float(match.group(2)))
        return drops

    async def stop(self, *, kill: bool = False) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if kill:
                    self.process.kill()
                else:
                    self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await asyncio.wait_for(self.process.wait(), 5.0)
        shutil.rmtree(self.workdir, ignore_errors=True)


#: realip-broker's admin socket in its working directory: the benchmarks read its drop counters
#: (``/metrics``) from it, nothing else.
ADMIN_SOCKET = "admin.sock"

REALIP_ALL_LISTENERS = f"""\
listeners:
  tcp:
    default: {{bind: "127.0.0.1:0"}}
    pp: {{bind: "127.0.0.1:0", proxy_protocol: true}}
  ws:
    default: {{bind: "127.0.0.1:0"}}
    xff:
      bind: "127.0.0.1:0"
      trusted_proxies: ["127.0.0.1/32"]
      websocket: {{proxy_address_header: X-Forwarded-For}}
admin: {{listen: "unix:{ADMIN_SOCKET}"}}
"""


async def _abandon(proc: asyncio.subprocess.Process, workdir: Path) -> None:
    """A broker that failed to start: kill it, drop its directory."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5.0)
    shutil.rmtree(workdir, ignore_errors=True)


async def _wait_log_line(broker_proc: asyncio.subprocess.Process, log: Path, pattern: str) -> re.Match[str]:
    try:
        return await _wait_log_line_unguarded(broker_proc, log, pattern)
    except BaseException:
        await _abandon(broker_proc, log.parent)
        raise


async def _wait_log_line_unguarded(
    broker_proc: asyncio.subprocess.Process, log: Path, pattern: str
) -> re.Match[str]:
    deadline = time.monotonic() + START_TIMEOUT
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        match = regex.search(text)
        if match:
            return match
        if broker_proc.returncode is not None:
            raise BenchError(f"broker exited with {broker_proc.returncode}: {text[-2000:]}")
        await asyncio.sleep(0.05)
    raise BenchError(f"broker not ready within {START_TIMEOUT:g}s; log: {log}")


async def start_realip(
    config: str = REALIP_ALL_LISTENERS,
    label: str = REALIP,
    launcher: Sequence[str] | None = None,
    loop: str | None = None,
    prepare: Callable[[Path], None] | None = None,
) -> Broker:
    """realip-broker as operators run it (``serve --config``, log level info, logs to a file).

    ``launcher`` replaces ``python -m broker`` (the profiler runs the same command line under cProfile);
    ``loop`` (``asyncio``, ``uvloop``) is passed as ``--loop`` and checked against the loop the broker
    logs; None (the default) passes none: the broker's default loop, asyncio's. ``prepare`` is called
    with the working directory before the broker starts (to put files in its ``data`` directory).
    """
    workdir = Path(tempfile.mkdtemp(prefix="bench-realip-"))
    (workdir / "broker.yaml").write_text(config)
    if prepare is not None:
        try:
            prepare(workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
    log = workdir / "broker.log"
    with log.open("w") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *(launcher or [PYTHON, "-m", "broker"]),
            "serve",
            "--config",
            "broker.yaml",
            "--log-level",
            "info",
            *([] if loop is None else ["--loop", loop]),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env={**os.environ, "PYTHONPATH": str(REALIP_SRC[0])},
        )
    match = await _wait_log_line(proc, log, r"realip-broker ready: (.*)\n")
    ports: dict[str, int] = {}
    for item in match.group(1).split():
        name, _, hostport = item.partition("=")
        ports[name] = int(hostport.rpartition(":")[2])
    if "tcp:default" in ports:
        ports["tcp"] = ports["tcp:default"]
    logged = re.search(r"event loop: (\w+)", log.read_text(errors="replace"))
    if loop is not None and (logged is None or logged.group(1) != loop):
        await _abandon(proc, workdir)
        said = logged.group(0) if logged else "nothing about its loop"
        raise BenchError(f"{label}: asked for --loop {loop}, the broker logged {said!r}")
    return Broker(label, "realip", proc, ports, workdir, log, loop=logged.group(1) if logged else "?")


async def start_amqtt(label: str = AMQTT, launcher: Sequence[str] | None = None) -> Broker:
    """Plain amqtt 0.12.1 with its own TCP listener (``bench/amqtt_plain.py``; or ``launcher PORT``)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-amqtt-"))
    log = workdir / "broker.log"
    port = free_port()
    with log.open("w") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *(launcher or [PYTHON, str(BENCH / "amqtt_plain.py")]),
            str(port),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    await _wait_log_line(proc, log, r"plain amqtt ready")
    return Broker(label, "amqtt", proc, {"tcp": port}, workdir, log)


async def start_mosquitto(label: str = MOSQ) -> Broker:
    """Debian's mosquitto on a port of its own; ready when it accepts a TCP connection."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-mosquitto-"))
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # max_queued_messages 0: no cap on a client's QoS 1 queue (mosquitto drops past 1,000 by
    # default; amqtt and realip-broker never drop QoS 1), so that fan-in counts every message.
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\nmax_queued_messages 0\n"
    )
    log = workdir / "broker.log"
    with log.open("w") as log_file:
        proc = await asyncio.create_subprocess_exec(
            MOSQUITTO,
            "-c",
            str(conf),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if proc.returncode is not None or time.monotonic() > deadline:
                text = log.read_text()[-2000:]
                await _abandon(proc, workdir)
                raise BenchError(f"mosquitto did not start: {text}") from None
            await asyncio.sleep(0.02)
        else:
            writer.close()
            break
    return Broker(label, "mosquitto", proc, {"tcp": port}, workdir, log)


# --------------------------------------------------------------------------------------------------
# MQTT 3.1.1 packets, built by hand (no client library on the hot path)


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def connect_packet(client_id: bytes, keepalive: int = 60) -> bytes:
    body = b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big") + _string(client_id)
    return b"\x10" + remaining_length(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    body = _string(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body


def subscribe_packet(topic: bytes, qos: int, packet_id: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + _string(topic) + bytes([qos])
    return b"\x82" + remaining_length(len(body)) + body


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


DISCONNECT = b"\xe0\x00"
CONNACK_OK = b"\x20\x02\x00\x00"


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body)."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return first, await reader.readexactly(length) if length else b""


class RawClient:
    """A minimal asyncio MQTT 3.1.1 client on raw packets (optionally after a PROXY header)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, client_id: str, *, header: bytes = b"", keepalive: int = 60, timeout: float = 10.0
    ) -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(header + connect_packet(client_id.encode(), keepalive))
        connack = await asyncio.wait_for(reader.readexactly(4), timeout)
        if connack != CONNACK_OK:
            writer.close()
            raise BenchError(f"CONNACK {connack!r} for {client_id}")
        return cls(reader, writer)

    async def subscribe(self, topic: str, qos: int, timeout: float = 10.0) -> None:
        self.writer.write(subscribe_packet(topic.encode(), qos))
        first, _ = await asyncio.wait_for(read_packet(self.reader), timeout)
        if first != 0x90:
            raise BenchError(f"expected SUBACK, got packet type {first >> 4}")

    async def close(self) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            self.writer.write(DISCONNECT)
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


# --------------------------------------------------------------------------------------------------
# Client processes and their CPU


def children_cpu() -> float:
    """CPU seconds of this process plus its reaped children (the clients of a measurement)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


async def terminate(processes: Iterable[asyncio.subprocess.Process]) -> None:
    procs = [proc for proc in processes if proc.returncode is None]
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 3.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


# --------------------------------------------------------------------------------------------------
# Statistics and tables


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """``median [min-max]`` of ratios."""
    if not values:
        return "-"
    return f"{median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def add_rate_rows(
    table: Table, results: dict[str, list[tuple[float, float, float]]], base: list[tuple[float, float, float]]
) -> None:
    """One row per contender of a rate benchmark: median rate, per-round rates, the ratio to
    ``base`` taken within each round (median [min-max]), broker and client CPU.

    Each result is ``(rate, broker CPU share, client CPU share)`` per round.
    """
    for kind, values in results.items():
        ratios = [mine[0] / ref[0] for mine, ref in zip(values, base, strict=True)]
        table.add(
            kind,
            f"{median([v[0] for v in values]):,.0f}",
            " ".join(f"{v[0]:,.0f}" for v in values),
            spread(ratios),
            f"{median([v[1] for v in values]):.0%}",
            f"{median([v[2] for v in values]):.0%}",
        )


@dataclass
class Table:
    """A result table, printed as Markdown (paste-able into the README)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def render(self) -> str:
        widths = [len(col) for col in self.columns]
        for row in self.rows:
            for index, cell in enumerate(row):
                widths[index] = max(widths[index], len(cell))

        def line(cells: Sequence[str]) -> str:
            padded = [
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells)
            ]
            return "| " + " | ".join(padded) + " |"

        out = [f"### {self.title}", "", line(self.columns)]
        out.append(
            "| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
        )
        out.extend(line(row) for row in self.rows)
        if self.notes:
            out.append("")
            out.extend(f"- {note}" for note in self.notes)
        return "\n".join(out)


def fmt_rate(value: float) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.0f}"


def fmt_ratio(value: float) -> str:
    if value != value:
        return "-"
    return f"{value:.2f}x"


@dataclass
class Options:
    """What run.py passes to every benchmark."""

    quick: bool
    #: Brokers shared across benchmarks (started lazily by :func:`shared`), keyed by kind.
    brokers: dict[str, Broker] = field(default_factory=dict)
    #: The issue's acceptance criteria as measured: (criterion, measured, met).
    checks: list[tuple[str, str, bool]] = field(default_factory=list)

    def check(self, criterion: str, measured: str, met: bool) -> None:
        self.checks.append((criterion, measured, met))

    async def shared(self, kind: str) -> Broker:
        """The broker of ``kind`` (``realip``, ``realip-uvloop``, ``amqtt``, ``mosquitto``)."""
        if kind not in self.brokers:
            if kind == "realip-uvloop":
                self.brokers[kind] = await start_realip(label=REALIP_UVLOOP, loop="uvloop")
            elif kind == "realip":
                self.brokers[kind] = await start_realip()
            elif kind == "amqtt":
                self.brokers[kind] = await start_amqtt()
            elif kind == "mosquitto":
                self.brokers[kind] = await start_mosquitto()
            else:
                raise BenchError(f"unknown broker kind {kind!r}")
        return self.brokers[kind]

    async def close(self) -> None:
        for broker in self.brokers.values():
            await broker.stop()
        self.brokers.clear()
