"""How many PROXY protocol headers per second ``listeners.proxy_protocol`` parses.

Usage, from the repository root::

    python bench/bench_proxy_parse.py [--quick]

Each case parses the same header a fixed number of times (``--quick`` for a smoke run) and prints
headers/s and microseconds per header. Every case also checks its result once, so a broken parser
cannot look fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from listeners.proxy_protocol import (
    NEED_DATA,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_UNIQUE_ID,
    TLV,
    ProxyHeaderParser,
    build_v1,
    build_v2,
    parse,
)

MQTT_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
ITERATIONS = 20_000
QUICK_ITERATIONS = 1_000


def one_shot(data: bytes) -> Callable[[], object]:
    def run() -> object:
        return parse(data)

    return run


def chunked(data: bytes, pieces: int) -> Callable[[], object]:
    size = -(-len(data) // pieces)
    chunks = [data[start : start + size] for start in range(0, len(data), size)]

    def run() -> object:
        parser = ProxyHeaderParser()
        for chunk in chunks:
            result = parser.feed(chunk)
            if result is not NEED_DATA:
                return result
        raise AssertionError("header not complete after the last chunk")

    return run


def cases() -> list[tuple[str, Callable[[], object], int]]:
    v1_tcp4 = build_v1("203.0.113.7", "10.0.0.5", 51234, 1883) + MQTT_CONNECT
    v1_tcp6 = build_v1("2001:db8:85a3::8a2e:370:7334", "2001:db8::1", 51234, 1883) + MQTT_CONNECT
    v2_inet = build_v2(src_addr="203.0.113.7", dst_addr="10.0.0.5", src_port=51234, dst_port=1883)
    v2_inet6_tlvs = build_v2(
        src_addr="2001:db8:85a3::8a2e:370:7334",
        dst_addr="2001:db8::1",
        src_port=51234,
        dst_port=8883,
        tlvs=[
            TLV(PP2_TYPE_UNIQUE_ID, bytes(range(32))),
            TLV(PP2_TYPE_AUTHORITY, b"mqtt.example.com"),
        ],
        crc32c=True,
    )
    return [
        ("v1 TCP4 one-shot", one_shot(v1_tcp4), len(v1_tcp4) - len(MQTT_CONNECT)),
        ("v1 TCP6 one-shot", one_shot(v1_tcp6), len(v1_tcp6) - len(MQTT_CONNECT)),
        ("v2 INET, no TLVs", one_shot(v2_inet + MQTT_CONNECT), len(v2_inet)),
        ("v2 INET6, crc32c+unique_id+authority", one_shot(v2_inet6_tlvs + MQTT_CONNECT), len(v2_inet6_tlvs)),
        ("v1 TCP4 in 3 chunks", chunked(v1_tcp4, 3), len(v1_tcp4) - len(MQTT_CONNECT)),
    ]


def measure(run: Callable[[], object], iterations: int) -> float:
    """Seconds for ``iterations`` runs, best of 3 to dampen scheduler noise."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iterations):
            run()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS} iterations per case")
    args = parser.parse_args(argv)
    iterations = QUICK_ITERATIONS if args.quick else ITERATIONS

    rows = []
    for name, run, size in cases():
        result = run()
        if result is NEED_DATA or not isinstance(result, tuple) or result[0].length != size:
            raise SystemExit(f"{name}: unexpected result {result!r}")
        seconds = measure(run, iterations)
        rows.append((name, size, iterations / seconds, seconds / iterations * 1e6))

    width = max(len(name) for name, *_ in rows)
    print(f"{'case':<{width}}  {'bytes':>5}  {'headers/s':>11}  {'us/header':>9}")
    print(f"{'-' * width}  {'-' * 5}  {'-' * 11}  {'-' * 9}")
    for name, size, rate, micros in rows:
        print(f"{name:<{width}}  {size:>5}  {rate:>11,.0f}  {micros:>9.2f}")
    print(f"\n{iterations} iterations per case, best of 3, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
