"""Topic trees: the subscription index and the retained-message store [MQTT-4.7].

Both are tries of topic levels (the text between ``/``), as mosquitto's ``subs.c`` and
``retain.c`` and EMQX's ``emqx_trie`` keep them:

- :class:`SubscriptionTrie` maps topic *filters* to subscribers. :meth:`SubscriptionTrie.match`
  answers "who receives a PUBLISH to topic T" by following, at each level of T, only the literal
  level, ``+`` and ``#``: its cost grows with the branches T can reach, not with the number of
  filters stored.
- :class:`RetainedStore` maps topic *names* to retained messages. :meth:`RetainedStore.match`
  answers "which retained messages does a new subscription to F receive", lazily, so the engine
  can deliver them N at a time and stay fair to the other clients on the event loop.

Matching, as the spec words it:

- ``+`` matches exactly one level, which may be empty [MQTT-4.7.1-3];
- ``#`` matches its parent level and any number of levels below it, and is only ever the last
  level of a filter [MQTT-4.7.1-2] (``a/#`` matches ``a``, ``a/`` and ``a/b/c``);
- a filter starting with a wildcard never matches a topic name starting with ``$``
  [MQTT-4.7.2-1] (``#`` does not match ``$SYS/x``; ``$SYS/#`` does);
- otherwise levels compare exactly: case sensitive, no normalisation, empty levels count
  [MQTT-4.7.3-4].

Valid input is assumed where it costs: the engine validates topic names and filters (length,
UTF-8, level count, wildcards; [MQTT-4.7.1], [MQTT-4.7.3]) before calling. The methods that store
(:meth:`SubscriptionTrie.add`, :meth:`RetainedStore.set`) and :meth:`RetainedStore.match` still
check cheaply and raise :class:`ValueError`, so nothing invalid gets in; the lookups and
:meth:`SubscriptionTrie.match` (once per PUBLISH) never raise, and an invalid filter or name is
simply not found.

Nothing here recurses, so a topic of 60,000 empty levels costs a loop, not a stack overflow.
Standard library only, no I/O, not thread safe: the engine uses it from its event loop.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterator
from typing import Generic, Literal, TypeVar

__all__ = ["RetainedStore", "SubscriptionTrie"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: How much of an invalid filter or name a ValueError quotes (they may be 65,535 bytes long).
_QUOTE_LIMIT = 80


def _quote(text: str) -> str:
    return repr(text) if len(text) <= _QUOTE_LIMIT else repr(text[:_QUOTE_LIMIT]) + "..."


def _check_filter(topic_filter: str) -> None:
    """Raise :class:`ValueError` unless ``topic_filter`` is a valid topic filter.

    Same rules as :func:`broker.authorization.valid_filter`; the message cites the rule broken.
    """
    if not topic_filter:
        raise ValueError("a topic filter is at least one character long [MQTT-4.7.3-1]")
    if "\0" in topic_filter:
        raise ValueError(f"topic filter {_quote(topic_filter)} holds U+0000 [MQTT-4.7.3-2]")
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            raise ValueError(
                f"topic filter {_quote(topic_filter)}: '#' must be a whole level and the last one"
                " [MQTT-4.7.1-2]"
            )
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {_quote(topic_filter)}: '+' must be a whole level [MQTT-4.7.1-3]")


def _check_name(topic: str) -> None:
    """Raise :class:`ValueError` unless ``topic`` is a valid topic name."""
    if not topic:
        raise ValueError("a topic name is at least one character long [MQTT-4.7.3-1]")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic name {_quote(topic)} holds a wildcard [MQTT-4.7.1-1]")
    if "\0" in topic:
        raise ValueError(f"topic name {_quote(topic)} holds U+0000 [MQTT-4.7.3-2]")


# --------------------------------------------------------------------------------------------------
# Subscriptions
# --------------------------------------------------------------------------------------------------


class _FilterNode(Generic[K, V]):
    """One level of a filter. Invariant outside :meth:`SubscriptionTrie.remove`: every node but the
    root has children or subscribers (empty branches are pruned)."""

    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _FilterNode[K, V]] = {}
        #: Key -> value of every subscription whose filter ends at this node.
        self.subscribers: dict[K, V] = {}


class SubscriptionTrie(Generic[K, V]):
    """The subscription index: (topic filter, key) -> value, matched against topic names.

    ``key`` says who subscribed (a client id, a session object, a shared-subscription group...),
    ``value`` what with (QoS, options, subscription identifier...); the trie only stores them.
    One value per (filter, key): adding the pair again replaces it, as a SUBSCRIBE to a filter
    the session already has replaces that subscription [MQTT-3.8.4-3].
    """

    __slots__ = ("_entries", "_filters", "_nodes", "_root", "nodes_visited")

    def __init__(self) -> None:
        self._root: _FilterNode[K, V] = _FilterNode()
        self._entries = 0
        self._filters = 0
        self._nodes = 1
        #: Nodes :meth:`match` has examined since the trie was made (root included, once per call):
        #: a measure of its work that tests can assert and metrics can export. Never reset.
        self.nodes_visited = 0

    def __len__(self) -> int:
        """The number of (filter, key) entries."""
        return self._entries

    def __repr__(self) -> str:
        return f"<SubscriptionTrie entries={self._entries} filters={self._filters} nodes={self._nodes}>"

    @property
    def filter_count(self) -> int:
        """The number of distinct filters with at least one subscriber."""
        return self._filters

    @property
    def node_count(self) -> int:
        """The number of trie nodes, root included (1 when empty: branches are pruned)."""
        return self._nodes

    def add(self, topic_filter: str, key: K, value: V) -> bool:
        """Store ``value`` for (``topic_filter``, ``key``); True when the pair is new.

        An existing pair has its value replaced (and False is returned).

        Raises :class:`ValueError` if ``topic_filter`` is not a valid topic filter
        ([MQTT-4.7.1-2], [MQTT-4.7.1-3], [MQTT-4.7.3-1], [MQTT-4.7.3-2]); the trie is then unchanged.
        """
        _check_filter(topic_filter)
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _FilterNode()
                self._nodes += 1
            node = child
        subscribers = node.subscribers
        new = key not in subscribers
        if new:
            if not subscribers:
                self._filters += 1
            self._entries += 1
        subscribers[key] = value
        return new

    def remove(self, topic_filter: str, key: K) -> bool:
        """Forget (``topic_filter``, ``key``); True when it was stored. Never raises.

        Nodes left with neither children nor subscribers are removed, up to the root, so memory
        returns as subscriptions go.
        """
        levels = topic_filter.split("/")
        path = [self._root]
        node = self._root
        for level in levels:
            child = node.children.get(level)
            if child is None:
                return False
            path.append(child)
            node = child
        subscribers = node.subscribers
        if key not in subscribers:
            return False
        del subscribers[key]
        self._entries -= 1
        if subscribers:
            return True
        self._filters -= 1
        # path[depth + 1] is reached from path[depth] by levels[depth]; prune bottom up.
        for depth in range(len(levels) - 1, -1, -1):
            node = path[depth + 1]
            if node.children or node.subscribers:
                break
            del path[depth].children[levels[depth]]
            self._nodes -= 1
        return True

    def get(self, topic_filter: str, key: K) -> V | None:
        """The value stored for (``topic_filter``, ``key``), or None. Never raises."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node.subscribers.get(key)

    def match(self, topic: str) -> list[tuple[K, V]]:
        """Every (key, value) whose filter matches the topic name ``topic``, in no set order.

        A key subscribed with several filters that match appears once per matching filter: the
        engine merges them (one delivery at the highest QoS [MQTT-3.3.5-1], or, for MQTT 5, one
        per subscription identifier). Each (filter, key) appears at most once, as each node is
        reached at most once.

        ``topic`` must be a valid topic name (no ``+``, ``#`` or U+0000; the engine checks): a
        wildcard in it gives an unspecified result. Never raises.
        """
        # The hot path: one split, three dict lookups per reached node, no allocation per level
        # beyond the next frontier. A topic nobody subscribes to stops at the root.
        levels = iter(topic.split("/"))
        children = self._root.children
        matched: list[tuple[K, V]] = []
        nodes: list[_FilterNode[K, V]] = []
        if topic[:1] != "$":  # [MQTT-4.7.2-1]: no wildcard at the first level for "$" topics
            node = children.get("#")
            if node is not None:
                matched.extend(node.subscribers.items())
            node = children.get("+")
            if node is not None:
                nodes.append(node)
        node = children.get(next(levels))
        if node is not None:
            nodes.append(node)
        elif not nodes:
            self.nodes_visited += 1
            return matched
        visited = 1
        for level in levels:
            visited += len(nodes)
            following: list[_FilterNode[K, V]] = []
            for node in nodes:
                children = node.children
                if children:
                    child = children.get("#")
                    if child is not None:
                        matched.extend(child.subscribers.items())
                    child = children.get("+")
                    if child is not None:
                        following.append(child)
                    child = children.get(level)
                    if child is not None:
                        following.append(child)
            if not following:
                self.nodes_visited += visited
                return matched
            nodes = following
        # Every level consumed: the filters ending here match, and so does "<here>/#", since '#'
        # includes its parent level [MQTT-4.7.1-2].
        visited += len(nodes)
        for node in nodes:
            matched.extend(node.subscribers.items())
            child = node.children.get("#")
            if child is not None:
                matched.extend(child.subscribers.items())
        self.nodes_visited += visited
        return matched

    def items(self) -> Iterator[tuple[str, K, V]]:
        """Every (filter, key, value) stored, in no set order.

        Tolerates the trie changing between ``next()`` calls (each node's children and subscribers
        are copied when it is reached): an entry present throughout is yielded once; one added or
        removed meanwhile may or may not be. Never raises.
        """
        stack: list[tuple[str, _FilterNode[K, V]]] = [
            (level, node) for level, node in self._root.children.items()
        ]
        while stack:
            topic_filter, node = stack.pop()
            for key, value in list(node.subscribers.items()):
                yield topic_filter, key, value
            stack.extend((f"{topic_filter}/{level}", child) for level, child in node.children.items())


# --------------------------------------------------------------------------------------------------
# Retained messages
# --------------------------------------------------------------------------------------------------


class _Absent(enum.Enum):
    """Marks a topic node without a retained message (any value, None included, may be stored)."""

    ABSENT = enum.auto()


#: A frame depth meaning "below a '#': every node matches".
_EVERYTHING = -1


class _TopicNode(Generic[V]):
    """One level of a topic name. Invariant outside :meth:`RetainedStore.delete`: every node but
    the root has children or a value (empty branches are pruned). A pruned node stays empty for
    good, so a generator still holding one sees nothing there."""

    __slots__ = ("children", "topic", "value")

    def __init__(self) -> None:
        self.children: dict[str, _TopicNode[V]] = {}
        #: The full topic name, kept so that matching yields it without joining levels.
        self.topic = ""
        self.value: V | Literal[_Absent.ABSENT] = _Absent.ABSENT


class RetainedStore(Generic[V]):
    """Retained messages: topic name -> value, matched against topic filters.

    ``value`` is whatever the engine keeps for a retained message (the message object, a
    reference into its message store...). Any value may be stored, None included, though
    :meth:`get` and :meth:`delete` then cannot tell it from absence.
    """

    __slots__ = ("_count", "_nodes", "_root", "nodes_visited")

    def __init__(self) -> None:
        self._root: _TopicNode[V] = _TopicNode()
        self._count = 0
        self._nodes = 1
        #: Nodes the :meth:`match` and :meth:`topics` generators have reached since the store was
        #: made: a measure of their work for tests and metrics. Never reset.
        self.nodes_visited = 0

    def __len__(self) -> int:
        """The number of retained messages (topics with a value)."""
        return self._count

    def __repr__(self) -> str:
        return f"<RetainedStore topics={self._count} nodes={self._nodes}>"

    @property
    def node_count(self) -> int:
        """The number of trie nodes, root included (1 when empty: branches are pruned)."""
        return self._nodes

    def set(self, topic: str, value: V) -> None:
        """Retain ``value`` for ``topic``, replacing any value retained there.

        (An empty retained PUBLISH deletes instead [MQTT-3.3.1-10]: the engine calls
        :meth:`delete` for it.)

        Raises :class:`ValueError` if ``topic`` is not a valid topic name (empty, a wildcard,
        U+0000: [MQTT-4.7.3-1], [MQTT-4.7.1-1], [MQTT-4.7.3-2]); the store is then unchanged.
        """
        _check_name(topic)
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _TopicNode()
                self._nodes += 1
            node = child
        if node.value is _Absent.ABSENT:
            self._count += 1
        node.topic = topic
        node.value = value

    def delete(self, topic: str) -> V | None:
        """Forget the message retained for ``topic``; return it, or None if there was none.

        Nodes left with neither children nor a value are removed, up to the root. Never raises.
        """
        levels = topic.split("/")
        path = [self._root]
        node = self._root
        for level in levels:
            child = node.children.get(level)
            if child is None:
                return None
            path.append(child)
            node = child
        value = node.value
        if value is _Absent.ABSENT:
            return None
        node.value = _Absent.ABSENT
        node.topic = ""
        self._count -= 1
        for depth in range(len(levels) - 1, -1, -1):
            node = path[depth + 1]
            if node.children or node.value is not _Absent.ABSENT:
                break
            del path[depth].children[levels[depth]]
            self._nodes -= 1
        return value

    def get(self, topic: str) -> V | None:
        """The value retained for ``topic``, or None. Never raises."""
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        value = node.value
        return None if value is _Absent.ABSENT else value

    def topics(self) -> Iterator[str]:
        """Every topic with a retained message, ``$`` topics included, in no set order.

        Lazy and tolerant of changes between ``next()`` calls, as :meth:`match` is. Never raises.
        """
        return (topic for topic, _ in self._walk(["#"], dollar_rule=False))

    def match(self, topic_filter: str) -> Iterator[tuple[str, V]]:
        """Lazily yield the retained (topic, value) pairs that ``topic_filter`` matches.

        Only branches the filter allows are visited: a filter without wildcards is one lookup,
        ``a/+/c`` reads the children of ``a`` and one child of each, ``#`` walks everything but
        the top-level ``$`` branches [MQTT-4.7.2-1]. Order is unspecified. Take what you need
        (``itertools.islice(store.match(f), 100)``) and come back for more on a later loop
        iteration: the work done per ``next()`` is bounded by the nodes passed before the next hit
        (plus one copy of the child list of each node with a wildcard level below it).

        The store may change between ``next()`` calls (children are copied as each node is
        expanded; values are read when yielded). Then:

        - a topic retained for the whole iteration is yielded exactly once, with the value it has
          at that moment;
        - a topic set or deleted during the iteration may or may not be yielded (at most once,
          never after it was deleted), a topic deleted before the generator reaches it is not;
        - every pair yielded matches the filter and was in the store when it was yielded.

        Raises :class:`ValueError` at the call (not at the first ``next()``) if ``topic_filter`` is
        not a valid topic filter.
        """
        _check_filter(topic_filter)
        if "+" not in topic_filter and "#" not in topic_filter:
            return self._exact(topic_filter)
        return self._walk(topic_filter.split("/"), dollar_rule=True)

    def _exact(self, topic: str) -> Iterator[tuple[str, V]]:
        """The retained message of a filter without wildcards: a single lookup, done lazily."""
        self.nodes_visited += 1
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return
            self.nodes_visited += 1
            node = child
        value = node.value
        if value is not _Absent.ABSENT:
            yield node.topic, value

    def _walk(self, levels: list[str], *, dollar_rule: bool) -> Iterator[tuple[str, V]]:
        """Depth first over the nodes ``levels`` (a split filter) allows.

        ``dollar_rule``: a wildcard first level skips topics starting with ``$`` [MQTT-4.7.2-1].
        """
        last = len(levels)
        # Frames: (what is left of a snapshot of one node's children, their depth). A frame at
        # depth d holds nodes that matched levels[:d]; at _EVERYTHING, nodes below a '#'.
        stack: list[tuple[Iterator[_TopicNode[V]], int]] = [(iter((self._root,)), 0)]
        while stack:
            nodes, depth = stack[-1]
            node = next(nodes, None)
            if node is None:
                stack.pop()
                continue
            self.nodes_visited += 1
            if depth == _EVERYTHING:
                value = node.value
                if value is not _Absent.ABSENT:
                    yield node.topic, value
                if node.children:
                    stack.append((iter(list(node.children.values())), _EVERYTHING))
                continue
            if depth == last:
                value = node.value
                if value is not _Absent.ABSENT:
                    yield node.topic, value
                continue
            level = levels[depth]
            children = node.children
            if level == "#":
                # '#' includes its parent level [MQTT-4.7.1-2]; the root never holds a value.
                value = node.value
                if value is not _Absent.ABSENT:
                    yield node.topic, value
                if node.children:
                    stack.append((self._snapshot(node, depth, dollar_rule), _EVERYTHING))
            elif level == "+":
                if children:
                    stack.append((self._snapshot(node, depth, dollar_rule), depth + 1))
            else:
                child = children.get(level)
                if child is not None:
                    stack.append((iter((child,)), depth + 1))

    @staticmethod
    def _snapshot(node: _TopicNode[V], depth: int, dollar_rule: bool) -> Iterator[_TopicNode[V]]:
        """A copy of ``node``'s children to iterate while the store changes; at the root, without
        the ``$`` branches when the wildcard rule applies [MQTT-4.7.2-1]."""
        if depth == 0 and dollar_rule:
            return iter([child for level, child in node.children.items() if level[:1] != "$"])
        return iter(list(node.children.values()))
