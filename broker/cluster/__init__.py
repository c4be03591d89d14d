"""A cluster of brokers on Redis: the route table, the wire format between nodes, the node itself.

``routes.py`` and ``wire.py`` are pure; ``node.py`` is the asyncio glue to Redis (redis-py), the
only module here that does I/O. See ARCHITECTURE.md "Cluster".
"""
