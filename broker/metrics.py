"""Counters of the broker, exported as Prometheus text at scrape time.

The hot paths only bump plain integers (:class:`MessageCounters`); :class:`BrokerCollector` reads
them, the listeners' :class:`~listeners.connection.ListenerStats` and the live sessions when
``/metrics`` is scraped, so metrics cost nothing per message beyond an addition.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from listeners.connection import ListenerStats


@dataclass
class MessageCounters:
    """What the engine counts, over all listeners (plain integers: bumped on the hot path)."""

    #: PUBLISH packets received from and sent to clients.
    received: int = 0
    sent: int = 0
    #: Messages not delivered or not stored, by reason (queue_full, qos0_offline, not_authorized,
    #: session_discarded, sys_topic, publish_not_authorized, topic_levels, retained_full, ...).
    dropped: Counter[str] = field(default_factory=Counter)
    #: CONNECTs refused, by reason (access, banned, client_id, will_topic).
    refused: Counter[str] = field(default_factory=Counter)
    #: SUBSCRIBE filters refused (0x80), by reason.
    refused_subscriptions: Counter[str] = field(default_factory=Counter)
    #: Connections of admitted clients that ended, by reason.
    disconnected: Counter[str] = field(default_factory=Counter)
    #: CONNECTs refused, by (listener id, reason): ``ctl listeners`` shows them with the listener's
    #: own refusals (those decided before MQTT).
    refused_by_listener: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Bytes received from and written to clients (MQTT bytes, after PROXY headers and WebSocket
    #: framing).
    bytes_received: int = 0
    bytes_sent: int = 0
    #: Configuration reloads: done, failed.
    reloads: Counter[str] = field(default_factory=Counter)


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

    def __init__(  # noqa: PLR0917 - the state each metric is read from
        self,
        listeners: Callable[[], Iterable[StatsSource]],
        messages: MessageCounters,
        sessions: Callable[[], int],
        sizes: Callable[[], dict[str, int]] = dict,
        authentication: Callable[[], Mapping[tuple[str, str], int]] = dict,
        failure_bans: Callable[[], int] = int,
        authorization: Callable[[], Mapping[tuple[str, str], int]] = dict,
        ban_write_failures: Callable[[], int] = int,
        store: Callable[[], Mapping[str, int]] = dict,
        cluster: Callable[[], Mapping[str, Any]] = dict,
    ) -> None:
        """``authentication``: answers by (authenticator, result); ``failure_bans``: addresses
        banned for failed authentications; ``authorization``: source answers by (source, result);
        ``store``: the persistence store's counters (none when it is off); ``cluster``: the
        cluster's status (``ClusterNode.status``; none when this node is not in one)."""
        self._listeners = listeners
        self._messages = messages
        self._sessions = sessions
        self._sizes = sizes
        self._authentication = authentication
        self._failure_bans = failure_bans
        self._authorization = authorization
        self._ban_write_failures = ban_write_failures
        self._store = store
        self._cluster = cluster

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
        checks = CounterMetricFamily(
            "realip_health_checks",
            "Connections closed by the peer before sending a byte of MQTT (nothing, or only a PROXY "
            "header): load balancers' health checks, by listener",
            labels=["listener"],
        )
        for listener in self._listeners():
            stats = listener.stats
            live.add_metric([listener.id], stats.current)
            accepted.add_metric([listener.id], stats.accepted)
            for reason, count in sorted(stats.refused.items()):
                refused.add_metric([listener.id, reason], count)
            checks.add_metric([listener.id], stats.health_checks)
        yield live
        yield accepted
        yield refused
        yield checks
        yield GaugeMetricFamily("realip_sessions_connected", "MQTT clients connected", value=self._sessions())
        for name, help_text, value in (
            ("realip_bytes_received", "MQTT bytes received from clients", self._messages.bytes_received),
            ("realip_bytes_sent", "MQTT bytes written to clients", self._messages.bytes_sent),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family
        reloads = CounterMetricFamily(
            "realip_config_reloads", "Configuration reloads, by result", labels=["result"]
        )
        for result, count in sorted(self._messages.reloads.items()):
            reloads.add_metric([result], count)
        yield reloads
        received = CounterMetricFamily("realip_messages_received", "PUBLISH packets received from clients")
        received.add_metric([], self._messages.received)
        yield received
        sent = CounterMetricFamily("realip_messages_sent", "PUBLISH packets sent to clients")
        sent.add_metric([], self._messages.sent)
        yield sent
        for name, help_text, counts in (
            (
                "realip_messages_dropped",
                "Messages not delivered or not stored, by reason",
                self._messages.dropped,
            ),
            ("realip_connects_refused", "CONNECTs refused, by reason", self._messages.refused),
            (
                "realip_subscriptions_refused",
                "SUBSCRIBE filters refused, by reason",
                self._messages.refused_subscriptions,
            ),
            ("realip_disconnects", "Client connections ended, by reason", self._messages.disconnected),
        ):
            family = CounterMetricFamily(name, help_text, labels=["reason"])
            for reason, count in sorted(counts.items()):
                family.add_metric([reason], count)
            yield family
        answers = CounterMetricFamily(
            "realip_authentication",
            "Authenticator answers, by authenticator and result (allow, deny, ignore, error)",
            labels=["authenticator", "result"],
        )
        for (name, result), count in sorted(self._authentication().items()):
            answers.add_metric([name, result], count)
        yield answers
        sources = CounterMetricFamily(
            "realip_authorization_source",
            "Authorization source answers, by source and result (allow, deny, ignore)",
            labels=["source", "result"],
        )
        for (name, result), count in sorted(self._authorization().items()):
            sources.add_metric([name, result], count)
        yield sources
        bans = CounterMetricFamily(
            "realip_auth_failure_bans", "Client addresses banned for failed authentications"
        )
        bans.add_metric([], self._failure_bans())
        yield bans
        ban_writes = CounterMetricFamily(
            "realip_ban_file_write_failures", "Failed writes of the ban file (retried at the next change)"
        )
        ban_writes.add_metric([], self._ban_write_failures())
        yield ban_writes
        store = self._store()
        for key, help_text in (
            ("writes", "Persistence store transactions committed"),
            ("rows_written", "Persistence store rows written or deleted"),
            ("write_failures", "Persistence store writes that failed (retried at the next interval)"),
        ):
            if key in store:
                family = CounterMetricFamily(f"realip_store_{key}", help_text)
                family.add_metric([], store[key])
                yield family
        if "pending" in store:
            yield GaugeMetricFamily(
                "realip_store_pending", "Changes not yet handed to the store's writer", value=store["pending"]
            )
        yield from self._cluster_metrics()
        sizes = self._sizes()
        for key, help_text in (
            ("sessions", "Sessions held, connected or not"),
            ("subscriptions", "Subscriptions held"),
            ("retained", "Retained messages stored"),
            ("queued", "Messages waiting in session queues"),
            ("inflight", "QoS 1/2 deliveries awaiting acknowledgement"),
        ):
            if key in sizes:
                yield GaugeMetricFamily(f"realip_{key}", help_text, value=sizes[key])

    def _cluster_metrics(self) -> Iterator[Metric]:
        status = self._cluster()
        if not status:
            return
        for name, help_text, value in (
            (
                "realip_cluster_redis_up",
                "Whether this node reaches the cluster's Redis",
                int(status["redis"]["up"]),
            ),
            ("realip_cluster_nodes", "Live nodes of the cluster, this one included", len(status["nodes"])),
            (
                "realip_cluster_backlog",
                "Messages held for other nodes, not yet written to Redis",
                status["backlog"],
            ),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        forwarded = CounterMetricFamily(
            "realip_cluster_forwarded", "Messages forwarded to other nodes, by node", labels=["node"]
        )
        for node, count in sorted(status["forwarded"].items()):
            forwarded.add_metric([node], count)
        yield forwarded
        received = CounterMetricFamily("realip_cluster_received", "Messages received from other nodes")
        received.add_metric([], status["received"])
        yield received
        dropped = CounterMetricFamily(
            "realip_cluster_dropped", "Messages not forwarded or not readable, by reason", labels=["reason"]
        )
        for reason, count in sorted(status["dropped"].items()):
            dropped.add_metric([reason], count)
        yield dropped


def render(collector: BrokerCollector) -> bytes:
    """The Prometheus text exposition of ``collector``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
