"""realip-broker: an MQTT broker that knows each client's real address behind load balancers.

This package is the MQTT engine and everything operators touch (ARCHITECTURE.md has the map). It
is kept free of import-time side effects so that its pure parts (``broker.mqtt``, ``broker.core``)
import cheaply.
"""

__version__ = "0.1.0"
