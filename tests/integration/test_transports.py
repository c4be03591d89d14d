"""The push transports of :mod:`listeners`, in process: real sockets on loopback, a recording sink.

No broker process and no engine: each test starts a listener with a sink factory that records what
the listener pushes (and can echo it back), drives it with real clients (asyncio streams, raw TLS
over memory BIOs, websockets' client), and waits on what the sink or the refusal hook saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

import listeners.stream
from broker.settings import ListenerSettings, SslOptions, WebSocketOptions
from listeners.address import AddressSource, ClientAddress, Networks
from listeners.connection import Link, Sink
from listeners.options import Bind, ListenerOptions, ProxyProtocolMode
from listeners.proxy_protocol import build_v1, build_v2
from listeners.tcp import SslListener, TcpListener
from listeners.websocket import WebSocketListener
from tests.pki import Pki

#: Seconds anything that should happen "now" may take.
WAIT = 5.0

LB = "127.0.0.50"  # the trusted load balancer
STRANGER = "127.0.0.51"  # anyone else
CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"  # an MQTT CONNECT, client id ""
V1 = build_v1("203.0.113.7", "10.0.0.1", 61177, 1883)
V2 = build_v2(src_addr="2001:db8::7", dst_addr="2001:db8::1", src_port=4242, dst_port=1883)

Listener = TcpListener | WebSocketListener


# --------------------------------------------------------------------------------------------------
# The recording sink and the harness
# --------------------------------------------------------------------------------------------------


class RecordingSink:
    """Records everything the listener pushes; echoes the MQTT stream back when asked to."""

    def __init__(
        self, harness: Harness, link: Link, address: ClientAddress, options: ListenerOptions
    ) -> None:
        self.harness = harness
        self.link = link
        self.address = address
        self.options = options
        self.data = bytearray()
        self.lost: list[Exception | None] = []
        self.pauses = 0
        self.resumes = 0

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.harness.echo:
            self.link.write(data)
        self.harness.changed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)
        self.harness.changed()

    def pause_writing(self) -> None:
        self.pauses += 1
        self.harness.changed()

    def resume_writing(self) -> None:
        self.resumes += 1
        self.harness.changed()


@dataclass(frozen=True)
class Refusal:
    listener_id: str
    address: ClientAddress
    reason: str


@dataclass(frozen=True)
class Denied:
    """An admission verdict (as broker.access gives)."""

    reason: str
    message: str


class Harness:
    """The sink factory and refusal hook of the listeners under test, and a way to wait on them."""

    def __init__(self) -> None:
        self.sinks: list[RecordingSink] = []
        self.refusals: list[Refusal] = []
        self.echo = False
        self.fail_next = False
        self._changed = asyncio.Event()
        self._listeners: list[Listener] = []

    def changed(self) -> None:
        self._changed.set()

    def factory(self, link: Link, address: ClientAddress, options: ListenerOptions) -> Sink:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("engine bug")
        sink = RecordingSink(self, link, address, options)
        self.sinks.append(sink)
        self.changed()
        return sink

    def on_refused(self, listener_id: str, address: ClientAddress, reason: str) -> None:
        self.refusals.append(Refusal(listener_id, address, reason))
        self.changed()

    async def until(self, predicate: Callable[[], object], what: str) -> None:
        """Wait until ``predicate()`` holds; it is checked whenever a sink or the hook records."""
        try:
            async with asyncio.timeout(WAIT):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None

    async def sink(self, index: int = 0) -> RecordingSink:
        """The ``index``-th sink made, once it is."""
        await self.until(lambda: len(self.sinks) > index, f"sink #{index}")
        return self.sinks[index]

    async def received(self, sink: RecordingSink, n: int) -> bytes:
        """Every byte ``sink`` was given, once it has at least ``n``."""
        await self.until(lambda: len(sink.data) >= n, f"{n} bytes for the sink")
        return bytes(sink.data)

    async def refusal(self, index: int = 0) -> Refusal:
        """The ``index``-th refusal reported, once it is."""
        await self.until(lambda: len(self.refusals) > index, f"refusal #{index}")
        return self.refusals[index]

    async def start(self, listener: Listener) -> tuple[str, int]:
        await listener.start()
        self._listeners.append(listener)
        return listener.addresses()[0]

    def tcp(self, **options: Any) -> TcpListener:
        return TcpListener(settings("tcp", **options), self.factory, on_refused=self.on_refused)

    def ssl(self, **options: Any) -> SslListener:
        return SslListener(settings("ssl", **options), self.factory, on_refused=self.on_refused)

    def ws(
        self, *, admit: Any = None, max_packet_size: int = 1024 * 1024, **options: Any
    ) -> WebSocketListener:
        kind = "wss" if "ssl_options" in options else "ws"
        return WebSocketListener(
            settings(kind, **options),
            self.factory,
            on_refused=self.on_refused,
            admit=admit,
            max_packet_size=max_packet_size,
        )

    def stop(self) -> None:
        for listener in self._listeners:
            listener.stop_accepting()
            listener.abort_connections()


def settings(kind: str, **options: Any) -> ListenerSettings:
    """A listener's settings as broker.settings builds them, on 127.0.0.1 and a free port."""
    fields: dict[str, Any] = {"type": kind, "name": "t", "bind": Bind("127.0.0.1", 0)}
    if kind in ("ws", "wss"):
        fields["websocket"] = WebSocketOptions(
            mqtt_path="/mqtt",
            proxy_address_header=options.pop("address_header", ""),
            proxy_port_header=options.pop("port_header", ""),
        )
    if "trusted_proxies" in options:
        options["trusted_proxies"] = Networks.parse(options["trusted_proxies"])
    if "proxy_protocol" in options:
        options["proxy_protocol"] = ProxyProtocolMode(options["proxy_protocol"])
    fields.update(options)
    return ListenerSettings(**fields)


# broker.settings.ListenerSettings is what app.py hands the listeners: it must satisfy the
# listeners' own protocol (mypy checks this assignment when run on this file).
_: ListenerOptions = ListenerSettings(type="tcp", name="typed")


@pytest.fixture
async def harness() -> Any:
    made = Harness()
    yield made
    made.stop()
    for _ in range(3):  # let the aborted transports call connection_lost
        await asyncio.sleep(0)


# --------------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------------


async def open_client(
    address: tuple[str, int], source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address, local_addr=(source, 0))


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    async with asyncio.timeout(WAIT):
        return await reader.readexactly(n)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (EOF or reset) with nothing (more) sent."""
    try:
        async with asyncio.timeout(WAIT):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True


async def let_the_server_read() -> None:
    """Yield until the listener, on this same loop, has read what a loopback write delivered.

    A loopback send is readable at once: the next iteration's select sees it and queues the read
    callback after our resumption; a second yield lets that callback run before we go on.
    """
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def client_tls(pki: Pki, *, cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def ssl_options(pki: Pki, **options: Any) -> SslOptions:
    return SslOptions(
        certfile=str(pki.server_cert), keyfile=str(pki.server_key), cacertfile=str(pki.ca), **options
    )


class BioTlsClient:
    """A TLS client over memory BIOs, so that the PROXY header and the ClientHello go out in ONE
    write (one loopback segment): the case the exact header read before TLS exists for."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    async def handshake(self, header: bytes) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.writer.write(header + self.outgoing.read())
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                await self._pull()
        self._flush()

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    async def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                data += self.tls.read(n - len(data))
            except ssl.SSLWantReadError:
                await self._pull()
        return data

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.writer.write(self.outgoing.read())

    async def _pull(self) -> None:
        async with asyncio.timeout(WAIT):
            data = await self.reader.read(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.incoming.write(data)


def ws_url(address: tuple[str, int], path: str = "/mqtt", scheme: str = "ws") -> str:
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"{scheme}://{host}:{address[1]}{path}"


def ws_connect(address: tuple[str, int], source: str = "127.0.0.1", **kwargs: Any) -> Any:
    kwargs.setdefault("subprotocols", ["mqtt"])
    kwargs.setdefault("open_timeout", WAIT)
    if "sock" not in kwargs:
        kwargs["local_addr"] = (source, 0)
    return connect(ws_url(address, kwargs.pop("path", "/mqtt"), kwargs.pop("scheme", "ws")), **kwargs)


async def refused_status(address: tuple[str, int], **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(address, **kwargs):
            pass
    return int(info.value.response.status_code)


def raw_socket_with_header(address: tuple[str, int], header: bytes, source: str) -> socket.socket:
    """A connected socket that already sent ``header`` (for clients that take a ``sock``)."""
    sock = socket.create_connection(address, timeout=WAIT, source_address=(source, 0))
    sock.sendall(header)
    sock.setblocking(False)
    return sock


# --------------------------------------------------------------------------------------------------
# tcp
# --------------------------------------------------------------------------------------------------


async def test_tcp_direct_client_gets_its_socket_address_and_an_echo(harness: Harness) -> None:
    harness.echo = True
    listener = harness.tcp()
    address = await harness.start(listener)
    reader, writer = await open_client(address, source="127.0.0.41")
    writer.write(CONNECT)
    assert await read_exactly(reader, len(CONNECT)) == CONNECT
    sink = await harness.sink()
    assert sink.address == ClientAddress.direct("127.0.0.41", writer.get_extra_info("sockname")[1])
    assert sink.options is listener.settings
    assert (listener.stats.current, listener.stats.accepted) == (1, 1)
    assert not sink.link.is_closing and sink.link.ssl_object() is None
    writer.close()
    await harness.until(lambda: sink.lost, "connection_lost")
    assert sink.lost == [None]
    assert listener.stats.current == 0


async def test_tcp_on_ipv6_loopback(harness: Harness) -> None:
    harness.echo = True
    address = await harness.start(
        harness.tcp(bind=Bind("::1", 0), proxy_protocol="optional", trusted_proxies=["::1"])
    )
    reader, writer = await open_client(address, source="::1")
    writer.write(build_v1("2001:db8::9", "2001:db8::1", 5000, 1883) + CONNECT)
    assert await read_exactly(reader, len(CONNECT)) == CONNECT
    sink = await harness.sink()
    assert (sink.address.ip, sink.address.port, sink.address.proxy_ip) == ("2001:db8::9", 5000, "::1")
    writer.close()


@pytest.mark.parametrize(
    ("header", "ip", "port", "source"),
    [
        (V1, "203.0.113.7", 61177, AddressSource.PROXY_PROTOCOL_V1),
        (V2, "2001:db8::7", 4242, AddressSource.PROXY_PROTOCOL_V2),
    ],
)
async def test_proxy_header_with_mqtt_bytes_in_the_same_segment(
    harness: Harness, header: bytes, ip: str, port: int, source: AddressSource
) -> None:
    listener = harness.tcp(proxy_protocol="true", trusted_proxies=[f"{LB}/32"])
    address = await harness.start(listener)
    _, writer = await open_client(address, source=LB)
    writer.write(header + CONNECT)
    sink = await harness.sink()
    assert await harness.received(sink, len(CONNECT)) == CONNECT
    assert (sink.address.ip, sink.address.port, sink.address.source) == (ip, port, source)
    assert (sink.address.proxy_ip, sink.address.proxy_port) == (LB, writer.get_extra_info("sockname")[1])
    writer.close()


@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
async def test_proxy_header_split_at_every_offset(harness: Harness, header: bytes) -> None:
    stream = header + CONNECT
    listener = harness.tcp(proxy_protocol="true", trusted_proxies=[f"{LB}/32"])
    address = await harness.start(listener)
    for offset in range(1, len(stream)):
        made = len(harness.sinks)
        _, writer = await open_client(address, source=LB)
        writer.write(stream[:offset])
        await let_the_server_read()
        # Until the header is complete nothing reaches the engine; after it, the sink has what came.
        if offset < len(header):
            assert len(harness.sinks) == made, offset
        else:
            assert bytes(harness.sinks[made].data) == stream[len(header) : offset], offset
        writer.write(stream[offset:])
        sink = await harness.sink(made)
        assert await harness.received(sink, len(CONNECT)) == CONNECT, offset
        assert sink.address.proxy_ip == LB
        writer.close()
    assert harness.refusals == []


async def test_proxy_header_timeout(harness: Harness) -> None:
    listener = harness.tcp(proxy_protocol="true", proxy_protocol_timeout=0.2)
    address = await harness.start(listener)
    reader, writer = await open_client(address)
    writer.write(V1[:10])  # a header that never completes
    refusal = await harness.refusal()
    assert refusal.reason == "proxy_timeout"
    assert await closed_by_server(reader)
    assert listener.stats.refused == {"proxy_timeout": 1}
    assert harness.sinks == []
    writer.close()


@pytest.mark.parametrize(
    ("options", "source", "data", "reason"),
    [
        # proxy_protocol true with trusted_proxies: a stranger is dropped before a byte is read.
        ({"proxy_protocol": "true", "trusted_proxies": [f"{LB}/32"]}, STRANGER, b"", "untrusted_proxy"),
        # optional: a header from a stranger is a spoofing attempt.
        ({"proxy_protocol": "optional", "trusted_proxies": [f"{LB}/32"]}, STRANGER, V1, "untrusted_header"),
        # true: MQTT without a header.
        ({"proxy_protocol": "true"}, LB, CONNECT, "not_proxy_protocol"),
        # a header the strict parser refuses.
        ({"proxy_protocol": "true"}, LB, b"PROXY TCP4 010.0.0.1 10.0.0.2 1 2\r\n", "v1_bad_address"),
    ],
)
async def test_refusals_and_their_reasons(
    harness: Harness, options: dict[str, Any], source: str, data: bytes, reason: str
) -> None:
    listener = harness.tcp(**options)
    address = await harness.start(listener)
    reader, writer = await open_client(address, source=source)
    writer.write(data)
    refusal = await harness.refusal()
    assert (refusal.listener_id, refusal.reason, refusal.address.ip) == ("tcp:t", reason, source)
    assert await closed_by_server(reader)
    assert listener.stats.refused == {reason: 1}
    assert harness.sinks == []
    writer.close()


async def test_optional_mode_serves_clients_without_a_header(harness: Harness) -> None:
    address = await harness.start(harness.tcp(proxy_protocol="optional", trusted_proxies=[f"{LB}/32"]))
    _, writer = await open_client(address, source=STRANGER)
    writer.write(CONNECT)
    sink = await harness.sink()
    assert await harness.received(sink, len(CONNECT)) == CONNECT
    assert (sink.address.ip, sink.address.source) == (STRANGER, AddressSource.SOCKET)
    writer.close()


async def test_max_connections_counts_connections_still_in_their_proxy_header(harness: Harness) -> None:
    listener = harness.tcp(proxy_protocol="true", max_connections=2)
    address = await harness.start(listener)
    silent = [await open_client(address) for _ in range(2)]  # in their PROXY header, for now
    reader, writer = await open_client(address)
    refusal = await harness.refusal()
    assert refusal.reason == "max_connections"
    assert await closed_by_server(reader)
    assert (listener.stats.current, listener.stats.accepted) == (2, 2)
    # One of them finishes its header and leaves: its slot is free again.
    silent[0][1].write(V1)
    sink = await harness.sink()
    silent[0][1].close()
    await harness.until(lambda: sink.lost, "connection_lost")
    assert listener.stats.current == 1
    _, third = await open_client(address)
    third.write(V1 + CONNECT)
    second = await harness.sink(1)
    assert await harness.received(second, len(CONNECT)) == CONNECT
    assert listener.stats.refused == {"max_connections": 1}
    for _, w in (silent[1], (None, third), (None, writer)):
        w.close()


async def test_pause_writing_reaches_the_sink_when_the_client_stops_reading(harness: Harness) -> None:
    address = await harness.start(harness.tcp())
    reader, writer = await open_client(address)
    writer.write(CONNECT)
    sink = await harness.sink()
    chunk = b"x" * (1024 * 1024)
    written = 0
    while not sink.pauses:  # the kernel's buffers fill first, then the transport's
        assert written < 256 * len(chunk), "never paused"
        sink.link.write(chunk)
        written += len(chunk)
    assert (sink.pauses, sink.resumes) == (1, 0)
    assert len(await read_exactly(reader, written)) == written
    await harness.until(lambda: sink.resumes, "resume_writing")
    assert (sink.pauses, sink.resumes) == (1, 1)
    writer.close()


async def test_close_flushes_what_is_queued_then_closes(harness: Harness) -> None:
    address = await harness.start(harness.tcp())
    reader, writer = await open_client(address)
    writer.write(CONNECT)
    sink = await harness.sink()
    payload = bytes(range(256)) * 32 * 1024  # 8 MiB: more than the socket buffers hold
    sink.link.writelines([payload[: len(payload) // 2], payload[len(payload) // 2 :]])
    sink.link.close()
    assert sink.link.is_closing
    sink.link.write(b"ignored")  # once closing, writes are dropped
    async with asyncio.timeout(WAIT):
        received = await reader.read()  # until EOF
    assert received == payload
    writer.close()  # the listener half-closed; the connection ends when the client closes too
    await harness.until(lambda: sink.lost, "connection_lost")
    sink.link.close()  # a second close is harmless
    await let_the_server_read()
    assert sink.lost == [None]
    writer.close()


async def test_close_drops_a_peer_that_does_not_read(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listeners.stream, "CLOSE_TIMEOUT", 0.2)
    address = await harness.start(harness.tcp())
    _, writer = await open_client(address)
    writer.write(CONNECT)
    sink = await harness.sink()
    for _ in range(32):  # far more than the kernel buffers take: the transport keeps the rest
        sink.link.write(b"y" * (1024 * 1024))
    sink.link.close()
    await harness.until(lambda: sink.lost, "connection_lost after CLOSE_TIMEOUT")
    assert len(sink.lost) == 1
    writer.close()


async def test_abort_drops_at_once_and_connection_lost_comes_once(harness: Harness) -> None:
    listener = harness.tcp()
    address = await harness.start(listener)
    reader, writer = await open_client(address)
    writer.write(CONNECT)
    sink = await harness.sink()
    sink.link.abort()
    sink.link.abort()
    assert await closed_by_server(reader)
    await harness.until(lambda: sink.lost, "connection_lost")
    await let_the_server_read()
    assert sink.lost == [None]
    assert listener.stats.current == 0
    writer.close()


async def test_a_failing_sink_factory_costs_one_connection(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    listener = harness.tcp()
    address = await harness.start(listener)
    harness.fail_next = True
    reader, writer = await open_client(address, source="127.0.0.42")
    writer.write(CONNECT)
    assert await closed_by_server(reader)
    assert "tcp:t: connection from 127.0.0.42:" in caplog.text and "engine bug" in caplog.text
    harness.echo = True
    reader2, writer2 = await open_client(address)
    writer2.write(CONNECT)
    assert await read_exactly(reader2, len(CONNECT)) == CONNECT
    for w in (writer, writer2):
        w.close()


async def test_abort_connections_drops_every_live_connection(harness: Harness) -> None:
    listener = harness.tcp()
    address = await harness.start(listener)
    clients = [await open_client(address) for _ in range(3)]
    for _, writer in clients:
        writer.write(CONNECT)
    await harness.until(lambda: len(harness.sinks) == 3, "three sinks")
    listener.stop_accepting()
    listener.abort_connections()
    await harness.until(lambda: all(sink.lost for sink in harness.sinks), "every connection_lost")
    assert listener.stats.current == 0
    with pytest.raises(OSError):
        await open_client(address)
    for _, writer in clients:
        writer.close()


# --------------------------------------------------------------------------------------------------
# ssl
# --------------------------------------------------------------------------------------------------


async def test_ssl_direct_with_a_client_certificate(harness: Harness, pki: Pki) -> None:
    harness.echo = True
    listener = harness.ssl(ssl_options=ssl_options(pki, verify=True))
    address = await harness.start(listener)
    reader, writer = await asyncio.open_connection(
        *address, ssl=client_tls(pki, cert=True), server_hostname="localhost"
    )
    writer.write(CONNECT)
    assert await read_exactly(reader, len(CONNECT)) == CONNECT
    sink = await harness.sink()
    assert sink.address.tls is not None
    assert (sink.address.tls.source, sink.address.tls.cert_cn, sink.address.tls.cert_verified) == (
        "local",
        Pki.CLIENT_CN,
        True,
    )
    assert sink.link.ssl_object() is not None
    writer.close()
    await harness.until(lambda: sink.lost, "connection_lost")
    assert (listener.stats.current, listener.stats.accepted) == (0, 1)


async def test_ssl_proxy_header_and_client_hello_in_one_segment(harness: Harness, pki: Pki) -> None:
    harness.echo = True
    listener = harness.ssl(ssl_options=ssl_options(pki), proxy_protocol="true", trusted_proxies=[f"{LB}/32"])
    address = await harness.start(listener)
    reader, writer = await open_client(address, source=LB)
    client = BioTlsClient(reader, writer, client_tls(pki))
    await client.handshake(V2)
    client.send(CONNECT)
    assert await client.recv(len(CONNECT)) == CONNECT
    sink = await harness.sink()
    assert (sink.address.ip, sink.address.proxy_ip, sink.address.source) == (
        "2001:db8::7",
        LB,
        AddressSource.PROXY_PROTOCOL_V2,
    )
    assert sink.address.tls is not None and sink.address.tls.source == "local"
    writer.close()


async def test_ssl_handshake_failure_and_timeout_are_refused(harness: Harness, pki: Pki) -> None:
    listener = harness.ssl(ssl_options=ssl_options(pki, handshake_timeout=0.3))
    address = await harness.start(listener)
    reader, writer = await open_client(address)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")  # not TLS
    assert (await harness.refusal(0)).reason == "tls_error"
    assert await closed_by_server(reader)
    silent_reader, silent = await open_client(address)
    assert (await harness.refusal(1)).reason == "tls_timeout"
    assert await closed_by_server(silent_reader)
    assert listener.stats.refused == {"tls_error": 1, "tls_timeout": 1}
    assert listener.stats.current == 0
    for w in (writer, silent):
        w.close()


async def test_ssl_max_connections_counts_handshakes_in_progress(harness: Harness, pki: Pki) -> None:
    listener = harness.ssl(ssl_options=ssl_options(pki), max_connections=1)
    address = await harness.start(listener)
    _, pending = await open_client(address)  # accepted, handshake not started
    reader, writer = await open_client(address)
    assert (await harness.refusal()).reason == "max_connections"
    assert await closed_by_server(reader)
    for w in (pending, writer):
        w.close()


async def test_an_unusable_certificate_is_an_oserror_without_errno(harness: Harness, pki: Pki) -> None:
    listener = harness.ssl(ssl_options=SslOptions(certfile="/nope.pem", keyfile=str(pki.server_key)))
    with pytest.raises(OSError, match=r"certfile: cannot read /nope\.pem") as info:
        await listener.start()
    assert info.value.errno == 0


# --------------------------------------------------------------------------------------------------
# ws / wss
# --------------------------------------------------------------------------------------------------


async def test_ws_upgrade_echo_and_client_close(harness: Harness) -> None:
    harness.echo = True
    listener = harness.ws()
    address = await harness.start(listener)
    async with ws_connect(address, source="127.0.0.43") as ws:
        assert ws.subprotocol == "mqtt"
        await ws.send(CONNECT)
        assert await asyncio.wait_for(ws.recv(), WAIT) == CONNECT
        sink = await harness.sink()
        assert (sink.address.ip, sink.address.source) == ("127.0.0.43", AddressSource.SOCKET)
        pong = await ws.ping(b"hi")
        await asyncio.wait_for(pong, WAIT)  # answered by the protocol, not the sink
        assert bytes(sink.data) == CONNECT
    await harness.until(lambda: sink.lost, "connection_lost")
    assert sink.lost == [None]
    assert (listener.stats.current, listener.stats.accepted) == (0, 1)


async def test_ws_fragmented_binary_messages_reach_the_sink_as_one_stream(harness: Harness) -> None:
    address = await harness.start(harness.ws())
    async with ws_connect(address) as ws:
        await ws.send([CONNECT[:3], CONNECT[3:7], CONNECT[7:]])  # one message in three frames
        await ws.send(b"\xc0\x00")  # PINGREQ in a message of its own
        sink = await harness.sink()
        assert await harness.received(sink, len(CONNECT) + 2) == CONNECT + b"\xc0\x00"


async def test_ws_writelines_is_one_frame_and_write_one_each(harness: Harness) -> None:
    address = await harness.start(harness.ws())
    async with ws_connect(address) as ws:
        await ws.send(CONNECT)
        sink = await harness.sink()
        sink.link.writelines([b"\x20\x02", b"\x00", b"\x00"])
        sink.link.write(b"\xd0\x00")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"\x20\x02\x00\x00"
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"\xd0\x00"


async def test_ws_close_sends_1000_then_closes(harness: Harness) -> None:
    address = await harness.start(harness.ws())
    async with ws_connect(address) as ws:
        await ws.send(CONNECT)
        sink = await harness.sink()
        sink.link.write(b"\x20\x02\x00\x00")
        sink.link.close()
        assert sink.link.is_closing
        sink.link.write(b"dropped")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"\x20\x02\x00\x00"
        with pytest.raises(ConnectionClosedOK) as info:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000
    await harness.until(lambda: sink.lost, "connection_lost")
    assert sink.lost == [None]


async def test_ws_text_frame_is_closed_with_1003(harness: Harness) -> None:
    address = await harness.start(harness.ws())
    async with ws_connect(address) as ws:
        await ws.send(CONNECT)
        await ws.send("not MQTT")
        with pytest.raises(ConnectionClosedError) as info:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1003
    sink = await harness.sink()
    await harness.until(lambda: sink.lost, "connection_lost")
    assert bytes(sink.data) == CONNECT


async def test_ws_oversized_message_is_closed_with_1009(harness: Harness) -> None:
    address = await harness.start(harness.ws(max_packet_size=1024))
    async with ws_connect(address) as ws:
        await ws.send(CONNECT)
        await ws.send(b"\x30" * 2048)
        with pytest.raises(ConnectionClosedError) as info:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    sink = await harness.sink()
    await harness.until(lambda: sink.lost, "connection_lost")
    assert bytes(sink.data) == CONNECT


async def test_ws_other_paths_get_404(harness: Harness) -> None:
    listener = harness.ws()
    address = await harness.start(listener)
    assert await refused_status(address, path="/other") == 404
    assert listener.stats.refused == {"not_found": 1}
    assert harness.refusals == []  # a page request is not an audited refusal
    async with ws_connect(address, path="/mqtt?x=1"):
        pass


async def test_ws_without_the_mqtt_subprotocol_gets_400(harness: Harness) -> None:
    listener = harness.ws()
    address = await harness.start(listener)
    assert await refused_status(address, subprotocols=None) == 400
    assert harness.sinks == []
    assert harness.refusals == []  # websockets' own refusal: not an audited one (as before)


async def test_ws_health_checks_and_scanners_are_quiet(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    listener = harness.ws()
    address = await harness.start(listener)
    _, health = await open_client(address)  # a TCP health check: connect, close
    health.close()
    reader, scanner = await open_client(address)
    scanner.write(b"\x16\x03\x01\x00\x05hello\r\n\r\n")  # not HTTP
    assert await closed_by_server(reader)
    assert harness.refusals == [] and harness.sinks == []
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.INFO and r.name.startswith(("websockets", "listeners"))
    ]
    assert loud == []
    assert "opening handshake failed" in caplog.text  # at DEBUG, with the peer
    scanner.close()


async def test_ws_forwarded_headers_with_trusted_proxies(harness: Harness) -> None:
    address = await harness.start(
        harness.ws(
            trusted_proxies=[f"{LB}/32"], address_header="X-Forwarded-For", port_header="X-Forwarded-Port"
        )
    )
    headers = [("X-Forwarded-For", f"6.6.6.6, 198.51.100.7, {LB}"), ("X-Forwarded-Port", "4242")]
    async with ws_connect(address, source=LB, additional_headers=headers):
        sink = await harness.sink(0)
        assert (sink.address.ip, sink.address.port, sink.address.proxy_ip) == ("198.51.100.7", 4242, LB)
        assert sink.address.source is AddressSource.X_FORWARDED_FOR
        assert sink.address.details["forwarded"]["chain"] == ["6.6.6.6", "198.51.100.7", LB]
    # A client connecting directly cannot forge its address.
    async with ws_connect(address, source=STRANGER, additional_headers=headers):
        sink = await harness.sink(1)
        assert (sink.address.ip, sink.address.source, sink.address.proxy_ip) == (
            STRANGER,
            AddressSource.SOCKET,
            None,
        )


async def test_ws_malformed_header_from_a_trusted_peer_gets_400(harness: Harness) -> None:
    listener = harness.ws(trusted_proxies=[f"{LB}/32"], address_header="X-Forwarded-For")
    address = await harness.start(listener)
    status = await refused_status(address, source=LB, additional_headers=[("X-Forwarded-For", "not-an-ip")])
    assert status == 400
    refusal = await harness.refusal()
    assert (refusal.reason, refusal.address.ip) == ("malformed_address", LB)
    assert listener.stats.refused == {"malformed_address": 1}


async def test_ws_address_refused_by_admission_gets_403(harness: Harness) -> None:
    asked: list[tuple[str, str]] = []

    def admit(listener_id: str, ip: str) -> Denied | None:
        asked.append((listener_id, ip))
        return Denied("access", f"{ip} is refused by the access rules") if ip == "198.51.100.9" else None

    listener = harness.ws(admit=admit, trusted_proxies=[f"{LB}/32"], address_header="X-Real-IP")
    address = await harness.start(listener)
    status = await refused_status(address, source=LB, additional_headers=[("X-Real-IP", "198.51.100.9")])
    assert status == 403
    refusal = await harness.refusal()
    assert (refusal.reason, refusal.address.ip, refusal.address.proxy_ip) == ("access", "198.51.100.9", LB)
    assert asked == [("ws:t", "198.51.100.9")]
    assert harness.sinks == []


async def test_ws_max_connections_gets_503(harness: Harness) -> None:
    listener = harness.ws(max_connections=1)
    address = await harness.start(listener)
    async with ws_connect(address):
        await harness.sink()
        assert await refused_status(address) == 503
        assert (await harness.refusal()).reason == "max_connections"
    await harness.until(lambda: harness.sinks[0].lost, "connection_lost")
    async with ws_connect(address):  # the slot is free again
        await harness.sink(1)


async def test_ws_proxy_protocol_then_upgrade(harness: Harness) -> None:
    listener = harness.ws(proxy_protocol="true", trusted_proxies=[f"{LB}/32"])
    address = await harness.start(listener)
    sock = raw_socket_with_header(address, V1, LB)
    async with ws_connect(address, sock=sock):
        sink = await harness.sink()
        assert (sink.address.ip, sink.address.proxy_ip, sink.address.source) == (
            "203.0.113.7",
            LB,
            AddressSource.PROXY_PROTOCOL_V1,
        )
    # A stranger is dropped before a byte is read.
    reader, writer = await open_client(address, source=STRANGER)
    assert (await harness.refusal()).reason == "untrusted_proxy"
    assert await closed_by_server(reader)
    writer.close()


async def test_wss_with_and_without_a_proxy_header(harness: Harness, pki: Pki) -> None:
    harness.echo = True
    listener = harness.ws(
        ssl_options=ssl_options(pki), proxy_protocol="optional", trusted_proxies=[f"{LB}/32"]
    )
    address = await harness.start(listener)
    tls = client_tls(pki)
    async with ws_connect(
        address, scheme="wss", ssl=tls, server_hostname="localhost", source="127.0.0.44"
    ) as ws:
        await ws.send(CONNECT)
        assert await asyncio.wait_for(ws.recv(), WAIT) == CONNECT
        sink = await harness.sink(0)
        assert sink.address.ip == "127.0.0.44"
        assert sink.address.tls is not None and sink.address.tls.source == "local"
        assert sink.link.ssl_object() is not None
    sock = raw_socket_with_header(address, V2, LB)
    async with ws_connect(address, scheme="wss", ssl=tls, server_hostname="localhost", sock=sock) as ws:
        await ws.send(CONNECT)
        assert await asyncio.wait_for(ws.recv(), WAIT) == CONNECT
        sink = await harness.sink(1)
        assert (sink.address.ip, sink.address.proxy_ip) == ("2001:db8::7", LB)
    await harness.until(lambda: all(s.lost for s in harness.sinks), "every connection_lost")
    assert (listener.stats.current, listener.stats.accepted) == (0, 2)


# --------------------------------------------------------------------------------------------------
# Health checks: a peer that closes before sending a byte of its own stream (nothing, or only a
# PROXY header, LOCAL or not) is counted, and logged at DEBUG only
# --------------------------------------------------------------------------------------------------

LOCAL = build_v2(command="LOCAL")  # what HAProxy's `check` sends with `check-send-proxy`


async def eventually(predicate: Callable[[], object], what: str) -> None:
    """Poll ``predicate`` (for what no sink or hook reports, such as a counter)."""
    try:
        async with asyncio.timeout(WAIT):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def close_with(writer: asyncio.StreamWriter, how: str) -> None:
    if how == "rst":  # HAProxy closes its checks with a reset (SO_LINGER 0), saving a TIME_WAIT
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def loud_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("listeners")]


@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize(
    ("kind", "mode", "prefix"),
    [
        ("tcp", "false", b""),
        ("tcp", "true", b""),
        ("tcp", "true", LOCAL),
        ("tcp", "true", V1),
        ("tcp", "optional", LOCAL),
        ("ws", "false", b""),
        ("ws", "true", LOCAL),
    ],
    ids=[
        "tcp",
        "tcp-proxy-nothing",
        "tcp-proxy-local",
        "tcp-proxy-v1",
        "tcp-optional-local",
        "ws",
        "ws-local",
    ],
)
async def test_health_checks_are_counted_at_debug(
    harness: Harness, caplog: pytest.LogCaptureFixture, kind: str, mode: str, prefix: bytes, how: str
) -> None:
    caplog.set_level(logging.DEBUG)
    trusted = [] if mode == "false" else ["127.0.0.1/32"]
    listener = getattr(harness, kind)(proxy_protocol=mode, trusted_proxies=trusted)
    address = await harness.start(listener)
    for _ in range(3):
        _, writer = await open_client(address)
        if prefix:
            writer.write(prefix)
            await writer.drain()
            await eventually(lambda: listener.stats.current, "the connection")
            await let_the_server_read()
        await close_with(writer, how)
    await eventually(lambda: listener.stats.health_checks == 3, "three health checks")
    await eventually(lambda: listener.stats.current == 0, "the connections to go")
    assert harness.refusals == []
    assert loud_records(caplog) == []
    assert "health check (closed without sending MQTT)" in caplog.text


async def test_what_is_not_a_health_check(harness: Harness) -> None:
    listener = harness.tcp(proxy_protocol="true", proxy_protocol_timeout=0.3)
    address = await harness.start(listener)
    # PROXY LOCAL then MQTT: a real client (HAProxy's own checks send LOCAL; the address is the LB's).
    _, client = await open_client(address)
    client.write(LOCAL + CONNECT)
    sink = await harness.sink()
    assert await harness.received(sink, len(CONNECT)) == CONNECT
    assert sink.address.source is AddressSource.SOCKET
    await close_with(client, "fin")
    # Part of a header, then a close.
    _, partial = await open_client(address)
    partial.write(V1[:10])
    await partial.drain()
    await let_the_server_read()
    await close_with(partial, "fin")
    # Silent until we close it (proxy_timeout): our close, a refusal.
    silent_reader, silent = await open_client(address)
    assert (await harness.refusal()).reason == "proxy_timeout"
    assert await closed_by_server(silent_reader)
    silent.close()
    await eventually(lambda: listener.stats.current == 0, "the connections to go")
    assert listener.stats.health_checks == 0


async def test_ssl_health_checks_are_not_tls_errors(
    harness: Harness, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    listener = harness.ssl(ssl_options=ssl_options(pki), proxy_protocol="optional", trusted_proxies=[LB])
    address = await harness.start(listener)
    _, writer = await open_client(address)
    await close_with(writer, "fin")
    _, local = await open_client(address, source=LB)
    local.write(LOCAL)
    await close_with(local, "rst")
    await eventually(lambda: listener.stats.health_checks == 2, "two health checks")
    assert harness.refusals == [] and loud_records(caplog) == []
    # A TLS session without MQTT (HAProxy's check-ssl) is one too.
    _, writer = await asyncio.open_connection(*address, ssl=client_tls(pki), server_hostname="localhost")
    await close_with(writer, "fin")
    await eventually(lambda: listener.stats.health_checks == 3, "a TLS health check")
    assert harness.refusals == []


# --------------------------------------------------------------------------------------------------
# Reload: prepare (what can fail) then commit; what comes next follows the new settings
# --------------------------------------------------------------------------------------------------


async def test_new_settings_apply_to_the_next_connection_only(harness: Harness) -> None:
    harness.echo = True
    listener = harness.tcp()
    address = await harness.start(listener)
    reader, before = await open_client(address)
    before.write(CONNECT)
    assert await read_exactly(reader, len(CONNECT)) == CONNECT
    strict = settings("tcp", proxy_protocol="true", trusted_proxies=[f"{LB}/32"])
    await listener.commit(await listener.prepare(strict))
    assert listener.addresses()[0] == address  # same bind: same socket
    # The connection made before goes on; a new one must come from the balancer, with a header.
    before.write(CONNECT)
    assert await read_exactly(reader, len(CONNECT)) == CONNECT
    stranger_reader, stranger = await open_client(address, source=STRANGER)
    assert (await harness.refusal()).reason == "untrusted_proxy"
    assert await closed_by_server(stranger_reader)
    sock = raw_socket_with_header(address, V1, LB)
    sock.sendall(CONNECT)
    sink = await harness.sink(1)
    assert (sink.address.ip, sink.address.proxy_ip) == ("203.0.113.7", LB)
    for w in (before, stranger):
        w.close()
    sock.close()


async def test_a_new_bind_is_bound_at_prepare_and_served_at_commit(harness: Harness) -> None:
    harness.echo = True
    listener = harness.tcp()
    old = await harness.start(listener)
    reader, before = await open_client(old)
    moved = settings("tcp", bind=Bind("127.0.0.2", 0))
    opening = await listener.prepare(moved)
    assert listener.addresses()[0] == old  # nothing changed yet
    await listener.commit(opening)
    new = listener.addresses()[0]
    assert new[0] == "127.0.0.2"
    with pytest.raises(ConnectionRefusedError):
        await open_client(old)
    _, after = await open_client(new)
    await harness.sink(1)
    before.write(CONNECT)  # accepted from the old socket: goes on
    assert await read_exactly(reader, len(CONNECT)) == CONNECT
    for w in (before, after):
        w.close()


async def test_a_failed_prepare_changes_nothing(harness: Harness, pki: Pki) -> None:
    listener = harness.ssl(ssl_options=ssl_options(pki))
    address = await harness.start(listener)
    broken = settings(
        "ssl", bind=Bind("127.0.0.2", 0), ssl_options=SslOptions(certfile="/nope.pem", keyfile="/nope.key")
    )
    with pytest.raises(OSError, match=r"certfile: cannot read /nope\.pem") as info:
        await listener.prepare(broken)
    assert info.value.errno == 0
    assert listener.addresses()[0] == address
    _, writer = await asyncio.open_connection(*address, ssl=client_tls(pki), server_hostname="localhost")
    writer.write(CONNECT)
    await harness.sink()
    writer.close()


async def test_ws_takes_new_header_rules_and_message_size(harness: Harness) -> None:
    listener = harness.ws(address_header="X-Forwarded-For", trusted_proxies=["127.0.0.60/32"])
    address = await harness.start(listener)
    headers = {"X-Forwarded-For": "203.0.113.9"}
    async with ws_connect(address, additional_headers=headers):
        assert (await harness.sink(0)).address.ip == "127.0.0.1"  # not trusted: header ignored
    trusting = settings("ws", address_header="X-Forwarded-For", trusted_proxies=["127.0.0.1/32"])
    await listener.commit(await listener.prepare(trusting, max_packet_size=16))
    async with ws_connect(address, additional_headers=headers) as ws:
        assert (await harness.sink(1)).address.ip == "203.0.113.9"
        await ws.send(b"x" * 17)  # above the new largest message: closed with 1009
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
