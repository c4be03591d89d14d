"""How bytes arrive and who sent them.

Pure parsers (:mod:`listeners.proxy_protocol`, :mod:`listeners.forwarded`, :mod:`listeners.address`,
:mod:`listeners.gate`) and thin asyncio transports (:mod:`listeners.tcp`, :mod:`listeners.websocket`,
built on :mod:`listeners.stream`). A listener hands each connection, as a
:class:`~listeners.connection.Link`, and its :class:`~listeners.address.ClientAddress` to a sink
factory given by :mod:`broker`, and pushes the bytes to the sink it returns.

This package imports only the standard library and ``websockets``: its settings types
(:mod:`listeners.options`) and errors (:mod:`listeners.errors`) are its own.
"""
