"""The MQTT engine's own core: pure data structures and protocol state, no I/O.

:mod:`broker.core.topics` holds the subscription index and the retained-message store.
"""
