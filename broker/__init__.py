"""realip-broker: an MQTT broker that knows each client's real address behind load balancers.

This package is the engine around amqtt and everything operators touch. It is kept free of
import-time side effects so that ``listeners`` may import :mod:`broker.errors` cheaply.
"""

__version__ = "0.1.0"
