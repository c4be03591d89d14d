"""Tests of :mod:`broker.core.topics`: spec truth tables, property tests against the oracle
:func:`broker.authorization.topic_matches`, pruning, iteration under change, and work bounds.

Invariants checked throughout:

* both structures agree with the oracle, whose ``$`` rule is the spec's [MQTT-4.7.2-1] (a filter
  starting with ``+`` or ``#`` never matches a topic starting with ``$``; a ``$`` deeper down is
  an ordinary character), for every filter set and topic drawn;
* after any sequence of changes the trie holds exactly one node per distinct level prefix of what
  is stored, plus the root: removal leaves no empty node behind;
* :meth:`SubscriptionTrie.match` visits the same number of nodes whether 20 or 20,000 unrelated
  filters are stored (asserted on ``nodes_visited``, not on time);
* :meth:`RetainedStore.match` tolerates any change between ``next()`` calls and keeps its promise:
  whatever is yielded matches and is current, topics untouched meanwhile are yielded exactly once.

Micro-benchmark (``.venv/bin/python -m tests.unit.test_topics``; CPython 3.11.7, one core of the
development VM; best of 5, ns per call)::

    SubscriptionTrie.match, 3-level topics        20 filters   20,000 filters
      no subscriber, filters dev/N/+ (1 node)          311            285
      no subscriber, unrelated filters (2 nodes)       463            456
      home/kitchen/temp, 5 hits (8 nodes)             1385           1379
      office/kitchen/light, 2 hits (3 nodes)          1276 (*)        817
    RetainedStore, 100,000 topics fleet/N/M
      match("fleet/7/7"), exhausted                    620
      match("fleet/+/7"), exhausted (100 lookups)    16089
      first 100 of match("#")                        24048

(*) noise: runs on this shared VM vary by 20-50 %; the node counts, asserted in the tests, do not.

Unrelated filters cost nothing per PUBLISH: the no-subscriber case is one ``split`` and three
dict lookups at the root (``"a/b/c".split("/")`` alone takes about 95 ns here).
"""

from __future__ import annotations

import itertools
import timeit
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.authorization import topic_matches, valid_filter
from broker.core.topics import RetainedStore, SubscriptionTrie, _Absent

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def prefix_count(entries: Iterable[str]) -> int:
    """The nodes a pruned trie holding ``entries`` (filters or topic names) has: one per distinct
    level prefix, plus the root."""
    prefixes: set[tuple[str, ...]] = set()
    for entry in entries:
        levels = tuple(entry.split("/"))
        prefixes.update(levels[:depth] for depth in range(1, len(levels) + 1))
    return len(prefixes) + 1


def trie_shape(store: SubscriptionTrie[Any, Any] | RetainedStore[Any]) -> tuple[int, int]:
    """(nodes, empty non-root nodes), counted by walking the internals (white box, on purpose)."""
    nodes = empty = 0
    stack: list[Any] = [store._root]
    while stack:
        node = stack.pop()
        nodes += 1
        if isinstance(store, SubscriptionTrie):
            holds = bool(node.subscribers)
        else:
            holds = node.value is not _Absent.ABSENT
        if node is not store._root and not node.children and not holds:
            empty += 1
        stack.extend(node.children.values())
    return nodes, empty


def assert_pruned(store: SubscriptionTrie[Any, Any] | RetainedStore[Any], entries: Iterable[str]) -> None:
    """No empty node anywhere, and exactly as many nodes as the entries need."""
    nodes, empty = trie_shape(store)
    assert empty == 0
    assert nodes == store.node_count == prefix_count(entries)


def subscription_trie(filters: Iterable[str]) -> SubscriptionTrie[str, int]:
    """A trie where each filter is subscribed by the key that is its own text."""
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    for topic_filter in filters:
        trie.add(topic_filter, topic_filter, 0)
    return trie


def matching_filters(trie: SubscriptionTrie[str, int], topic: str) -> list[str]:
    return sorted(key for key, _ in trie.match(topic))


# --------------------------------------------------------------------------------------------------
# Truth tables
# --------------------------------------------------------------------------------------------------

#: (filter, topic name, matches): the spec's non-normative examples first, then edges of our own.
TRUTH_TABLE = [
    # 4.7.1.2 Multi-level wildcard [MQTT-4.7.1-2]: '#' matches the parent and any number of levels.
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/tennis/player1/#", "sport/tennis", False),
    ("sport/#", "sport", True),  # "also matches the singular 'sport'"
    ("sport/#", "sport/", True),
    ("sport/#", "sports", False),
    ("#", "sport/tennis/player1", True),  # "'#' is valid and will receive every Application Message"
    ("#", "/", True),
    ("sport/tennis/#", "sport/tennis/player1", True),
    # 4.7.1.3 Single-level wildcard [MQTT-4.7.1-3]: '+' matches exactly one level, maybe empty.
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/tennis/+", "sport/tennis", False),
    ("sport/+", "sport", False),  # "'sport/+' does not match 'sport' but it does match 'sport/'"
    ("sport/+", "sport/", True),
    ("+", "sport", True),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("+/tennis/#", "sport/tennis", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("sport/+/player1", "sport//player1", True),
    ("+/+", "/finance", True),  # "'/finance' matches '+/+' and '/+', but not '+'"
    ("/+", "/finance", True),
    ("+", "/finance", False),
    # 4.7.3 Topic semantics [MQTT-4.7.3-4]: no normalisation; a leading '/' makes a distinct topic.
    ("/finance", "finance", False),
    ("finance", "/finance", False),
    ("ACCOUNTS", "Accounts", False),
    ("Accounts payable", "Accounts payable", True),
    ("/", "/", True),
    ("+/+", "/", True),
    ("+", "/", False),
    ("/#", "/", True),
    ("a//b", "a/b", False),
    # 4.7.2 Topics beginning with $ [MQTT-4.7.2-1]: not matched by a filter starting with a wildcard.
    ("#", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("#", "$SYS", False),
    ("+", "$SYS", False),
    ("+/#", "$SYS/x", False),
    ("#", "$", False),
    ("+", "$", False),
    ("$", "$", True),
    ("$SYS/+", "$SYS/x", True),
    ("$SYS", "$SYS/x", False),
    # ... only the first character of the topic counts: '$' deeper down is an ordinary character.
    ("a/+", "a/$b", True),
    ("a/#", "a/$SYS/x", True),
    ("+/+", "a/$b", True),
    ("/#", "/$SYS", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "matches"), TRUTH_TABLE)
def test_truth_table_oracle(topic_filter: str, topic: str, matches: bool) -> None:
    assert valid_filter(topic_filter)
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize(("topic_filter", "topic", "matches"), TRUTH_TABLE)
def test_truth_table_subscriptions(topic_filter: str, topic: str, matches: bool) -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    trie.add(topic_filter, "client", 1)
    assert trie.match(topic) == ([("client", 1)] if matches else [])


@pytest.mark.parametrize(("topic_filter", "topic", "matches"), TRUTH_TABLE)
def test_truth_table_retained(topic_filter: str, topic: str, matches: bool) -> None:
    store: RetainedStore[str] = RetainedStore()
    store.set(topic, "payload")
    assert list(store.match(topic_filter)) == ([(topic, "payload")] if matches else [])


def test_truth_table_all_at_once() -> None:
    """Every filter of the table in one trie, every topic in one store: same answers."""
    filters = sorted({row[0] for row in TRUTH_TABLE})
    topics = sorted({row[1] for row in TRUTH_TABLE})
    trie = subscription_trie(filters)
    store: RetainedStore[int] = RetainedStore()
    for index, topic in enumerate(topics):
        store.set(topic, index)
    for topic in topics:
        assert matching_filters(trie, topic) == [f for f in filters if topic_matches(f, topic)]
    for topic_filter in filters:
        expected = [(t, topics.index(t)) for t in topics if topic_matches(topic_filter, t)]
        assert sorted(store.match(topic_filter)) == expected


def test_sys_needs_its_own_subscription() -> None:
    """4.7.2: "subscribe to both '#' and '$SYS/#'" to receive both kinds of topic."""
    trie = subscription_trie(["#", "$SYS/#"])
    assert matching_filters(trie, "$SYS/broker/uptime") == ["$SYS/#"]
    assert matching_filters(trie, "sport/tennis") == ["#"]


# --------------------------------------------------------------------------------------------------
# Validation: stored input is checked, lookups never raise
# --------------------------------------------------------------------------------------------------

INVALID_FILTERS = [
    ("sport/tennis#", "MQTT-4.7.1-2"),
    ("sport/tennis/#/ranking", "MQTT-4.7.1-2"),
    ("#/a", "MQTT-4.7.1-2"),
    ("a/##", "MQTT-4.7.1-2"),
    ("sport+", "MQTT-4.7.1-3"),
    ("a/+b/c", "MQTT-4.7.1-3"),
    ("++", "MQTT-4.7.1-3"),
    ("", "MQTT-4.7.3-1"),
    ("a\0b", "MQTT-4.7.3-2"),
]

INVALID_NAMES = [
    ("", "MQTT-4.7.3-1"),
    ("a/+", "MQTT-4.7.1-1"),
    ("a/#", "MQTT-4.7.1-1"),
    ("sport+", "MQTT-4.7.1-1"),
    ("a\0b", "MQTT-4.7.3-2"),
]


@pytest.mark.parametrize(("topic_filter", "rule"), INVALID_FILTERS)
def test_invalid_filter_refused(topic_filter: str, rule: str) -> None:
    assert not valid_filter(topic_filter)
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    with pytest.raises(ValueError, match=rule):
        trie.add(topic_filter, "client", 1)
    assert len(trie) == 0
    assert trie.node_count == 1
    store: RetainedStore[int] = RetainedStore()
    with pytest.raises(ValueError, match=rule):
        store.match(topic_filter)  # at the call, not at the first next()
    # Lookups of what can never be stored find nothing and never raise.
    assert trie.get(topic_filter, "client") is None
    assert trie.remove(topic_filter, "client") is False


@pytest.mark.parametrize(("topic", "rule"), INVALID_NAMES)
def test_invalid_name_refused(topic: str, rule: str) -> None:
    store: RetainedStore[int] = RetainedStore()
    with pytest.raises(ValueError, match=rule):
        store.set(topic, 1)
    assert len(store) == 0
    assert store.node_count == 1
    assert store.get(topic) is None
    assert store.delete(topic) is None


def test_error_message_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"\.\.\.") as raised:
        SubscriptionTrie[str, int]().add("x" * 70_000 + "+", "client", 1)
    assert len(str(raised.value)) < 200


@FAST
@given(st.text(alphabet="ab/+#$\0", max_size=8))
def test_validation_agrees_with_valid_filter(text: str) -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    try:
        trie.add(text, "client", 1)
    except ValueError:
        assert not valid_filter(text)
    else:
        assert valid_filter(text)


# --------------------------------------------------------------------------------------------------
# SubscriptionTrie behaviour
# --------------------------------------------------------------------------------------------------


def test_add_replace_remove_get() -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    assert trie.add("a/+", "c1", 0) is True
    assert trie.add("a/+", "c1", 2) is False  # same (filter, key): replaced [MQTT-3.8.4-3]
    assert trie.add("a/+", "c2", 1) is True
    assert trie.add("a/#", "c1", 1) is True
    assert (len(trie), trie.filter_count, trie.node_count) == (3, 2, 4)
    assert trie.get("a/+", "c1") == 2
    assert trie.get("a/+", "c3") is None
    assert trie.get("a", "c1") is None  # an inner node is not a filter
    assert trie.get("a/+/b", "c1") is None
    assert sorted(trie.match("a/b")) == [("c1", 1), ("c1", 2), ("c2", 1)]
    assert sorted(trie.items()) == [("a/#", "c1", 1), ("a/+", "c1", 2), ("a/+", "c2", 1)]
    assert trie.remove("a/+", "c3") is False
    assert trie.remove("a", "c1") is False
    assert trie.remove("a/+", "c1") is True
    assert trie.remove("a/+", "c1") is False
    assert (len(trie), trie.filter_count) == (2, 2)
    assert trie.remove("a/+", "c2") is True
    assert (len(trie), trie.filter_count, trie.node_count) == (1, 1, 3)
    assert trie.remove("a/#", "c1") is True
    assert (len(trie), trie.filter_count, trie.node_count) == (0, 0, 1)
    assert trie.match("a/b") == []
    assert repr(trie) == "<SubscriptionTrie entries=0 filters=0 nodes=1>"


def test_overlapping_filters_give_one_entry_each() -> None:
    """A key appears once per matching filter; the engine merges (highest QoS [MQTT-3.3.5-1])."""
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    for qos, topic_filter in enumerate(["#", "a/#", "a/+/c", "a/b/c", "+/b/#", "a/b/c/#"]):
        trie.add(topic_filter, "c1", qos % 3)
    trie.add("a/b/c", "c2", 1)
    found = Counter(trie.match("a/b/c"))
    assert found == Counter({("c1", 0): 2, ("c1", 1): 2, ("c1", 2): 2, ("c2", 1): 1})


def test_keys_and_values_are_opaque() -> None:
    trie: SubscriptionTrie[tuple[str, int], dict[str, int]] = SubscriptionTrie()
    options = {"qos": 1, "subscription_identifier": 7}
    trie.add("x/+", ("client", 3), options)
    assert trie.match("x/y") == [(("client", 3), options)]
    assert trie.match("x/y")[0][1] is options


def test_subscription_pruning_returns_memory() -> None:
    filters = [f"site/{s}/dev/{d}/+" for s in range(10) for d in range(10)] + ["site/#", "#", "+/+"]
    trie = subscription_trie(filters)
    assert_pruned(trie, filters)
    for topic_filter in filters[::2]:
        assert trie.remove(topic_filter, topic_filter)
    assert_pruned(trie, filters[1::2])
    for topic_filter in filters[1::2]:
        assert trie.remove(topic_filter, topic_filter)
    assert trie.node_count == 1
    assert not trie._root.children


def test_deep_topics_do_not_recurse() -> None:
    """65,535 bytes of '/' is 65,536 empty levels: loops, never a RecursionError."""
    deep = "/" * 65_535
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    trie.add(deep, "c", 1)
    trie.add(deep[:-1] + "#", "c", 2)
    assert sorted(trie.match(deep)) == [("c", 1), ("c", 2)]
    assert len(list(trie.items())) == 2
    assert trie.remove(deep, "c")
    assert trie.remove(deep[:-1] + "#", "c")
    assert trie.node_count == 1
    store: RetainedStore[int] = RetainedStore()
    store.set(deep, 1)
    assert list(store.match("#")) == [(deep, 1)]
    assert list(store.match(deep)) == [(deep, 1)]
    assert list(store.topics()) == [deep]
    assert store.delete(deep) == 1
    assert store.node_count == 1


# --------------------------------------------------------------------------------------------------
# Property tests against the oracle
# --------------------------------------------------------------------------------------------------

#: A small alphabet of levels, so that random filters and topics often meet: empty levels, '$'
#: levels (a rule only at the first level) and case.
LEVELS = ["a", "b", "A", "", "$", "$SYS"]

topic_names = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*LEVELS, "+", "+"]), min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    text = "/".join(levels)
    return text if text else "+"


keys = st.sampled_from(["c1", "c2", "c3"])


@FAST
@given(
    st.lists(st.tuples(st.booleans(), topic_filters(), keys, st.integers(0, 2)), max_size=40),
    st.lists(topic_names, min_size=1, max_size=10),
)
def test_subscriptions_agree_with_oracle(ops: list[tuple[bool, str, str, int]], topics: list[str]) -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    model: dict[tuple[str, str], int] = {}
    for is_add, topic_filter, key, value in ops:
        if is_add:
            assert trie.add(topic_filter, key, value) is ((topic_filter, key) not in model)
            model[topic_filter, key] = value
        else:
            assert trie.remove(topic_filter, key) is ((topic_filter, key) in model)
            model.pop((topic_filter, key), None)
        assert len(trie) == len(model)
        assert trie.filter_count == len({f for f, _ in model})
        assert_pruned(trie, [f for f, _ in model])
    for topic in topics:
        expected = Counter((k, v) for (f, k), v in model.items() if topic_matches(f, topic))
        assert Counter(trie.match(topic)) == expected
    for (topic_filter, key), value in model.items():
        assert trie.get(topic_filter, key) == value
    assert sorted(trie.items()) == sorted((f, k, v) for (f, k), v in model.items())
    for topic_filter, key in model:
        assert trie.remove(topic_filter, key)
    assert (len(trie), trie.filter_count, trie.node_count) == (0, 0, 1)


@FAST
@given(
    st.lists(st.tuples(st.booleans(), topic_names, st.integers(0, 9)), max_size=40),
    st.lists(topic_filters(), min_size=1, max_size=10),
)
def test_retained_agrees_with_oracle(ops: list[tuple[bool, str, int]], filters: list[str]) -> None:
    store: RetainedStore[int] = RetainedStore()
    model: dict[str, int] = {}
    for is_set, topic, value in ops:
        if is_set:
            store.set(topic, value)
            model[topic] = value
        else:
            assert store.delete(topic) == model.pop(topic, None)
        assert len(store) == len(model)
        assert_pruned(store, model)
    for topic_filter in [*filters, *model]:  # topic names are filters too: the exact lookup
        expected = sorted((t, v) for t, v in model.items() if topic_matches(topic_filter, t))
        found = list(store.match(topic_filter))
        assert sorted(found) == expected
        assert len(found) == len(expected)  # each at most once
    for topic, value in model.items():
        assert store.get(topic) == value
    assert sorted(store.topics()) == sorted(model)
    for topic in list(model):
        assert store.delete(topic) == model[topic]
    assert (len(store), store.node_count) == (0, 1)


@FAST
@given(
    st.dictionaries(topic_names, st.integers(0, 9), max_size=20),
    topic_filters(),
    st.lists(
        st.one_of(
            st.just(("next", "", 0)),
            st.tuples(st.sampled_from(["set", "delete"]), topic_names, st.integers(10, 19)),
        ),
        max_size=40,
    ),
)
def test_retained_match_while_changing(
    initial: dict[str, int], topic_filter: str, steps: list[tuple[str, str, int]]
) -> None:
    """The store changes between next() calls: no error, and the documented promise holds."""
    store: RetainedStore[int] = RetainedStore()
    for topic, value in initial.items():
        store.set(topic, value)
    matches = store.match(topic_filter)
    yielded: list[str] = []
    touched: set[str] = set()

    def take() -> bool:
        item = next(matches, None)
        if item is None:
            return False
        topic, value = item
        assert topic_matches(topic_filter, topic)
        assert store.get(topic) == value  # current when yielded, never after its deletion
        assert topic not in yielded  # at most once
        yielded.append(topic)
        return True

    for action, topic, value in steps:
        if action == "next":
            take()
        elif action == "set":
            store.set(topic, value)
            touched.add(topic)
        else:
            store.delete(topic)
            touched.add(topic)
    while take():
        pass
    untouched = {t for t in initial if t not in touched and topic_matches(topic_filter, t)}
    assert untouched <= set(yielded)  # retained throughout: yielded (exactly once, see above)


def test_retained_match_survives_clearing_the_store() -> None:
    store: RetainedStore[int] = RetainedStore()
    for index in range(1000):
        store.set(f"room/{index % 10}/dev/{index}", index)
    matches = store.match("room/#")
    first = [next(matches) for _ in range(5)]
    for topic in list(store.topics()):
        store.delete(topic)
    assert store.node_count == 1
    assert list(matches) == []  # everything left was deleted before the generator reached it
    assert len(first) == 5
    # ... and topics set again meanwhile hang off nodes the generator has already passed.
    matches = store.match("#")
    store.set("late/topic", 1)
    assert list(matches) == [("late/topic", 1)]  # the root is expanded at the first next()


# --------------------------------------------------------------------------------------------------
# Work bounds (nodes visited, not time)
# --------------------------------------------------------------------------------------------------

#: Filters that PUBLISHes to the topics below must reach, and the topics.
RELEVANT = ["home/kitchen/temp", "home/+/temp", "home/#", "#", "+/kitchen/#", "$SYS/#"]
TOPICS = ["home/kitchen/temp", "home/garage/door", "office/kitchen/light", "nobody/here/x", "$SYS/load"]


def unrelated(count: int) -> list[str]:
    """Filters no topic of TOPICS matches, many of them siblings of the relevant ones."""
    shapes = ["home/room{}/temp", "dev{}/#", "+/room{}/x", "home/kitchen/temp{}", "$SYS/x{}/+"]
    return [shapes[i % len(shapes)].format(i) for i in range(count)]


def test_match_work_does_not_grow_with_unrelated_filters() -> None:
    visits = {}
    for count in (20, 20_000):
        trie = subscription_trie(RELEVANT + unrelated(count))
        assert len(trie) == len(RELEVANT) + count
        per_topic = []
        for topic in TOPICS:
            before = trie.nodes_visited
            assert matching_filters(trie, topic) == sorted(f for f in RELEVANT if topic_matches(f, topic))
            per_topic.append(trie.nodes_visited - before)
        visits[count] = per_topic
    assert visits[20] == visits[20_000]
    # Counted by hand (root, then each level's frontier, then the end nodes), which pins the
    # algorithm down. home/kitchen/temp: root; '+', 'home'; '+/kitchen', 'home/+', 'home/kitchen';
    # the two 'temp' ends = 8. home/garage/door: root; '+', 'home'; 'home/+' = 4 (no 'door' under
    # it). office/kitchen/light: root; '+'; '+/kitchen' (its '#' matches) = 3. nobody/here/x:
    # root; '+' = 2. $SYS/load: root (no wildcard branch for '$' [MQTT-4.7.2-1]); '$SYS' = 2.
    assert visits[20] == [8, 4, 3, 2, 2]


def test_topic_without_subscribers_stops_at_the_root() -> None:
    trie = subscription_trie(f"dev/{i}/+" for i in range(20_000))
    before = trie.nodes_visited
    assert trie.match("nobody/listens/here") == []
    assert trie.nodes_visited - before == 1


def test_retained_exact_filter_is_one_lookup() -> None:
    store: RetainedStore[int] = RetainedStore()
    for index in range(20_000):
        store.set(f"a/b/{index}", index)
    store.set("a/b/c", -1)
    before = store.nodes_visited
    assert list(store.match("a/b/c")) == [("a/b/c", -1)]
    assert store.nodes_visited - before == 4  # root, a, b, c
    before = store.nodes_visited
    assert list(store.match("a/x/c")) == []
    assert store.nodes_visited - before == 2  # root, a


def test_retained_wildcards_visit_only_allowed_branches() -> None:
    store: RetainedStore[int] = RetainedStore()
    for index in range(10_000):
        store.set(f"big/{index}/x", index)
    store.set("small/1/x", 1)
    store.set("small/2/y", 2)
    before = store.nodes_visited
    assert sorted(store.match("small/+/x")) == [("small/1/x", 1)]
    # root, small, its two children, then one lookup each: x found under 1 only.
    assert store.nodes_visited - before == 5
    before = store.nodes_visited
    assert list(store.match("+/3/x")) == [("big/3/x", 3)]
    assert store.nodes_visited - before == 5  # root, big, big/3, big/3/x, small (no '3' under it)


def test_retained_batches_are_bounded_work() -> None:
    """A new '#' subscriber over many retained messages, taken 100 at a time."""
    store: RetainedStore[int] = RetainedStore()
    for index in range(10_000):
        store.set(f"fleet/{index % 100}/{index}", index)
    store.set("$SYS/uptime", 0)  # never yielded to '#' [MQTT-4.7.2-1]
    matches = store.match("#")
    seen = 0
    while True:
        before = store.nodes_visited
        batch = list(itertools.islice(matches, 100))
        if not batch:
            break
        seen += len(batch)
        # Every visited node below fleet/N is a hit; only the 'fleet' and fleet/N nodes are not.
        assert store.nodes_visited - before <= len(batch) + 3
    assert seen == 10_000


# --------------------------------------------------------------------------------------------------
# Micro-benchmark: python -m tests.unit.test_topics
# --------------------------------------------------------------------------------------------------


def _per_call(function: object, number: int = 100_000) -> float:
    """Best of 5, in ns per call."""
    assert callable(function)
    return min(timeit.repeat(function, number=number, repeat=5)) / number * 1e9


def benchmark() -> None:
    for count in (20, 20_000):
        for label, trie in (
            ("dev/N/+", subscription_trie(f"dev/{i}/+" for i in range(count))),
            ("unrelated", subscription_trie(unrelated(count))),
            ("relevant+unrelated", subscription_trie(RELEVANT + unrelated(count))),
        ):
            topics = ["nobody/here/x"] if label != "relevant+unrelated" else TOPICS[:3]
            for topic in topics:
                hits = len(trie.match(topic))
                ns = _per_call(lambda trie=trie, topic=topic: trie.match(topic))
                print(f"SubscriptionTrie {count:>6} {label:18}  match({topic!r:22}) {hits} hits {ns:6.0f} ns")
    store: RetainedStore[int] = RetainedStore()
    for index in range(100_000):
        store.set(f"fleet/{index % 100}/{index}", index)
    ns = _per_call(lambda: list(store.match("fleet/7/7")))
    print(f"RetainedStore 100,000 topics  match('fleet/7/7') all         {ns:8.0f} ns")
    ns = _per_call(lambda: list(itertools.islice(store.match("#"), 100)), number=2_000)
    print(f"RetainedStore 100,000 topics  match('#') first 100           {ns:8.0f} ns")
    ns = _per_call(lambda: list(store.match("fleet/+/7")), number=10_000)
    print(f"RetainedStore 100,000 topics  match('fleet/+/7') all         {ns:8.0f} ns")


if __name__ == "__main__":
    benchmark()
