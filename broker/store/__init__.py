"""Persistence: the :class:`~broker.store.base.Store` seam and its implementations.

``base`` holds the protocol, :class:`~broker.store.base.StoredMessage` and the stores that keep no
file; ``sqlite`` the embedded default (``persistence.enable: true``), imported only when used.
"""

from __future__ import annotations

from broker.store.base import MemoryStore, NullStore, Store, StoredMessage, StoreError

__all__ = ["MemoryStore", "NullStore", "Store", "StoreError", "StoredMessage"]
