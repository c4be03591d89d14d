"""WebSocket connection rate with X-Forwarded-For resolution vs without, one broker process.

realip-broker runs two WebSocket listeners: ``ws:default`` (no address header configured) and
``ws:xff`` (``websocket.proxy_address_header: X-Forwarded-For``, ``trusted_proxies:
[127.0.0.1/32]``, so the header of a client from 127.0.0.1 is resolved). Each connection is an HTTP
upgrade (offering the ``mqtt`` subprotocol; to ``ws:xff`` with ``X-Forwarded-For: 203.0.113.7,
10.0.0.2``), then MQTT CONNECT -> CONNACK -> DISCONNECT in binary frames, then the closing handshake.

The client is a minimal asyncio WebSocket client on pre-built bytes (request, masked frames), so that
the client costs little next to the broker; ``--client websockets`` uses the websockets library
instead (heavier: it bounds the rate sooner). Rounds alternate between the listeners.

    python bench/run.py --only ws [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time

from benchlib import BenchError, Broker, Options, Table, add_rate_rows, connect_packet

#: (connections per round, rounds); full and quick.
SIZES = {False: (750, 8), True: (200, 2)}
CONCURRENCY = 50
XFF = "203.0.113.7, 10.0.0.2"

_CONNACK_FRAME = b"\x82\x04\x20\x02\x00\x00"


def _masked(opcode: int, payload: bytes) -> bytes:
    """A client frame with a zero masking key (valid; the payload is then unchanged)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def _request(port: int, xff: str | None) -> bytes:
    lines = [
        "GET /mqtt HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: mqtt",
    ]
    if xff is not None:
        lines.append(f"X-Forwarded-For: {xff}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def one_raw(port: int, request: bytes, index: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        if not head.startswith(b"HTTP/1.1 101"):
            raise BenchError(f"upgrade refused: {head[:80]!r}")
        writer.write(_masked(0x2, connect_packet(b"ws-bench-%d" % index)))
        frame = await asyncio.wait_for(reader.readexactly(6), 10.0)
        if frame != _CONNACK_FRAME:
            raise BenchError(f"expected CONNACK frame, got {frame!r}")
        writer.write(_masked(0x2, b"\xe0\x00") + _masked(0x8, b"\x03\xe8"))  # DISCONNECT, close 1000
        # The server answers the close frame and closes the TCP connection.
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 10.0)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def one_websockets(port: int, xff: str | None, index: int) -> None:
    from websockets.asyncio.client import connect

    headers = {"X-Forwarded-For": xff} if xff is not None else None
    async with connect(
        f"ws://127.0.0.1:{port}/mqtt",
        subprotocols=["mqtt"],  # type: ignore[list-item]
        additional_headers=headers,
        compression=None,
        open_timeout=10,
    ) as ws:
        await ws.send(connect_packet(b"ws-bench-%d" % index))
        connack = await asyncio.wait_for(ws.recv(), 10.0)
        if connack != b"\x20\x02\x00\x00":
            raise BenchError(f"expected CONNACK, got {connack!r}")
        await ws.send(b"\xe0\x00")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_round(
    broker: Broker, port: int, xff: str | None, connections: int, client: str
) -> tuple[float, float, float]:
    semaphore = asyncio.Semaphore(CONCURRENCY)
    request = _request(port, xff)

    async def guarded(index: int) -> None:
        async with semaphore:
            if client == "raw":
                await one_raw(port, request, index)
            else:
                await one_websockets(port, xff, index)

    cpu0, client0 = broker.cpu_seconds(), _own_cpu()
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(guarded(i) for i in range(connections))), 120)
    elapsed = time.perf_counter() - started
    return (
        connections / elapsed,
        (broker.cpu_seconds() - cpu0) / elapsed,
        (_own_cpu() - client0) / elapsed,
    )


async def measure(broker: Broker, connections: int, rounds: int, client: str = "raw") -> Table:
    kinds = {
        "ws, no address header": (broker.ports["ws:default"], None),
        "ws, X-Forwarded-For resolved": (broker.ports["ws:xff"], XFF),
    }
    for port, xff in kinds.values():
        await run_round(broker, port, xff, min(200, connections), client)  # warm-up
    results: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
    names = list(kinds)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for kind in order:
            port, xff = kinds[kind]
            results[kind].append(await run_round(broker, port, xff, connections, client))
    base = results[names[0]]
    table = Table(
        f"WebSocket connection rate, XFF resolution vs none ({connections:,} connections x {rounds} "
        f"rounds, {CONCURRENCY} in flight, {client} client)",
        ["listener", "conn/s (median)", "per round", "ratio to no header", "broker CPU", "client CPU"],
    )
    add_rate_rows(table, results, base)
    table.notes += [
        "Each connection: HTTP upgrade (subprotocol mqtt) -> CONNECT -> CONNACK -> DISCONNECT -> close "
        "handshake. XFF listener: proxy_address_header X-Forwarded-For, trusted_proxies 127.0.0.1/32; "
        f"header sent: '{XFF}' (the broker walks it right to left and sees 10.0.0.2).",
    ]
    return table


async def run(options: Options) -> list[Table]:
    connections, rounds = SIZES[options.quick]
    return [await measure(await options.shared("realip"), connections, rounds)]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--client", choices=["raw", "websockets"], default="raw")
    args = parser.parse_args()

    async def _standalone() -> None:
        options = Options(quick=args.quick)
        try:
            connections, rounds = SIZES[args.quick]
            print((await measure(await options.shared("realip"), connections, rounds, args.client)).render())
        finally:
            await options.close()

    asyncio.run(_standalone())
