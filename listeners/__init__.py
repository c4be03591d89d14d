"""How bytes arrive and who sent them.

Pure parsers (:mod:`listeners.proxy_protocol`, :mod:`listeners.forwarded`, :mod:`listeners.address`)
and thin asyncio servers (:mod:`listeners.tcp`, :mod:`listeners.websocket`). Nothing here imports
amqtt: a listener hands each connection and its :class:`~listeners.address.ClientAddress` to a
callable given by :mod:`broker`.
"""
