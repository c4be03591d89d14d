"""The cluster route table: which other nodes have a subscription matching a topic (pure).

Each node publishes the filters its local clients subscribe to (a set per node in Redis) and
caches every other node's. A PUBLISH is forwarded only to the nodes whose filters match its topic,
once per node however many of its filters match (the node then routes it to its own subscribers).

A shared subscription ``$share/{group}/{filter}`` is a route of its own, kept whole: the group (its
name and filter, MQTT 5 4.8.2) gets each matching message once in the whole cluster, so the node
that receives a PUBLISH picks one of the nodes with members of each matching group (itself
included: :meth:`RouteTable.pick`), in turn, and only that node delivers to a member.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from broker.core.topics import SubscriptionTrie

#: Topics whose answer is cached; emptied on every route change, and when it holds this many.
CACHE_SIZE = 10_000


def shared_filter(topic_filter: str) -> str | None:
    """The filter of a usable ``$share/{name}/{filter}`` route, or None for any other."""
    if not topic_filter.startswith("$share/") or topic_filter.count("/") < 2:
        return None
    _, name, rest = topic_filter.split("/", 2)
    if not name or not rest or "+" in name or "#" in name:
        return None
    return rest


class LocalFilters:
    """How many local subscriptions use each route filter: what this node tells the cluster.

    :meth:`add` and :meth:`remove` answer whether the filter's route appears or goes.
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._counts)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._counts))

    def add(self, topic_filter: str) -> bool:
        """One more subscription on ``topic_filter``; True when it is the first."""
        self._counts[topic_filter] += 1
        return self._counts[topic_filter] == 1

    def remove(self, topic_filter: str) -> bool:
        """One subscription fewer; True when it was the last. Never raises."""
        count = self._counts.get(topic_filter, 0)
        if count <= 1:
            self._counts.pop(topic_filter, None)
            return count == 1
        self._counts[topic_filter] = count - 1
        return False


class RouteTable:
    """The other nodes' filters, matched against topic names."""

    def __init__(self) -> None:
        self._trie: SubscriptionTrie[str, bool] = SubscriptionTrie()
        #: (shared route, node) on the route's filter: the groups with members on a node
        self._shared: SubscriptionTrie[tuple[str, str], bool] = SubscriptionTrie()
        self._filters: dict[str, set[str]] = {}
        self._cache: dict[str, tuple[str, ...]] = {}
        self._shared_cache: dict[str, dict[str, tuple[str, ...]]] = {}
        #: shared route -> how many messages it was given (who is next, in turn)
        self._turns: Counter[str] = Counter()

    def __len__(self) -> int:
        """Routes held (filter, node pairs)."""
        return len(self._trie) + len(self._shared)

    def nodes(self) -> list[str]:
        """The nodes that have routes, sorted."""
        return sorted(self._filters)

    def filters(self, node: str) -> set[str]:
        """The filters of ``node`` (a copy)."""
        return set(self._filters.get(node, ()))

    def add(self, node: str, topic_filter: str) -> None:
        """``node`` has a subscriber to ``topic_filter``."""
        if topic_filter not in self._filters.setdefault(node, set()):
            self._filters[node].add(topic_filter)
            shared = shared_filter(topic_filter)
            if shared is None:
                self._trie.add(topic_filter, node, True)
            else:
                self._shared.add(shared, (topic_filter, node), True)
            self._clear()

    def remove(self, node: str, topic_filter: str) -> None:
        """``node`` has none any more. Never raises."""
        filters = self._filters.get(node)
        if filters is not None and topic_filter in filters:
            filters.discard(topic_filter)
            if not filters:
                del self._filters[node]
            self._unroute(node, topic_filter)
            self._clear()

    def replace(self, node: str, filters: Iterable[str]) -> None:
        """``node``'s routes are exactly ``filters`` (a full read after a reconnect)."""
        self.drop(node)
        for topic_filter in filters:
            self.add(node, topic_filter)

    def drop(self, node: str) -> None:
        """Forget every route of ``node`` (it left, or died)."""
        for topic_filter in self._filters.pop(node, set()):
            self._unroute(node, topic_filter)
        self._clear()

    def _unroute(self, node: str, topic_filter: str) -> None:
        shared = shared_filter(topic_filter)
        if shared is None:
            self._trie.remove(topic_filter, node)
        else:
            self._shared.remove(shared, (topic_filter, node))

    def _clear(self) -> None:
        self._cache.clear()
        self._shared_cache.clear()
        if len(self._turns) > CACHE_SIZE:
            self._turns.clear()

    def shared(self, topic: str) -> dict[str, tuple[str, ...]]:
        """The shared routes matching ``topic``, each with the nodes that have members, sorted."""
        cached = self._shared_cache.get(topic)
        if cached is None:
            found: dict[str, set[str]] = {}
            for (route, node), _ in self._shared.match(topic):
                found.setdefault(route, set()).add(node)
            cached = {route: tuple(sorted(nodes)) for route, nodes in found.items()}
            if len(self._shared_cache) >= CACHE_SIZE:
                self._shared_cache.clear()
            self._shared_cache[topic] = cached
        return cached

    def pick(self, route: str, nodes: Iterable[str]) -> str:
        """The node whose turn it is to take the next message of shared ``route`` among ``nodes``
        (those with members, this one included if it has some): each in turn.

        Raises:
            ValueError: ``nodes`` is empty.
        """
        candidates = sorted(set(nodes))
        if not candidates:
            raise ValueError(f"no node has members of {route}")
        turn = self._turns[route]
        self._turns[route] = turn + 1
        return candidates[turn % len(candidates)]

    def match(self, topic: str) -> tuple[str, ...]:
        """The nodes with a (non-shared) filter matching ``topic``, each once, sorted."""
        cached = self._cache.get(topic)
        if cached is None:
            cached = tuple(sorted({node for node, _ in self._trie.match(topic)}))
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[topic] = cached
        return cached
