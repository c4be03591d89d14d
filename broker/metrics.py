"""Counters of the broker, exported as Prometheus text at scrape time.

The hot paths only bump plain integers (:class:`MessageCounters`); :class:`BrokerCollector` reads
them, the listeners' :class:`~listeners.connection.ListenerStats` and the live sessions when
``/metrics`` is scraped, so metrics cost nothing per message beyond an addition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from listeners.connection import ListenerStats


@dataclass
class MessageCounters:
    """PUBLISH packets received from and sent to clients, over all listeners."""

    received: int = 0
    sent: int = 0


class StatsSource(Protocol):
    """What the collector needs of a listener."""

    @property
    def id(self) -> str:
        """``type:name``."""

    @property
    def stats(self) -> ListenerStats:
        """Its counters."""


class BrokerCollector(Collector):
    """Builds every metric from live state at each scrape."""

    def __init__(
        self,
        listeners: Callable[[], Iterable[StatsSource]],
        messages: MessageCounters,
        sessions: Callable[[], int],
    ) -> None:
        self._listeners = listeners
        self._messages = messages
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (called by prometheus-client)."""
        live = GaugeMetricFamily(
            "realip_connections",
            "Open connections, by listener (including those not yet CONNECTed)",
            labels=["listener"],
        )
        accepted = CounterMetricFamily(
            "realip_connections_accepted", "Connections accepted, by listener", labels=["listener"]
        )
        refused = CounterMetricFamily(
            "realip_connections_refused",
            "Connections refused before reaching MQTT, by listener and reason",
            labels=["listener", "reason"],
        )
        for listener in self._listeners():
            stats = listener.stats
            live.add_metric([listener.id], stats.current)
            accepted.add_metric([listener.id], stats.accepted)
            for reason, count in sorted(stats.refused.items()):
                refused.add_metric([listener.id, reason], count)
        yield live
        yield accepted
        yield refused
        yield GaugeMetricFamily("realip_sessions_connected", "MQTT clients connected", value=self._sessions())
        received = CounterMetricFamily("realip_messages_received", "PUBLISH packets received from clients")
        received.add_metric([], self._messages.received)
        yield received
        sent = CounterMetricFamily("realip_messages_sent", "PUBLISH packets sent to clients")
        sent.add_metric([], self._messages.sent)
        yield sent


def render(collector: BrokerCollector) -> bytes:
    """The Prometheus text exposition of ``collector``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
