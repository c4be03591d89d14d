"""``mechanism: amqtt_plugin``: an amqtt authentication plugin hosted by its dotted path.

Everything that touches amqtt's internals is here, written against amqtt :data:`AMQTT_VERSION`
(``tests/unit/test_amqtt_plugin.py`` fails when the installed amqtt is another major.minor or
lacks what :func:`amqtt_incompatibilities` checks). The plugin is set up the way amqtt's own
broker does it (``amqtt/broker.py`` and ``amqtt/plugins/manager.py``, ``_load_str_plugin``):

- its ``Config`` dataclass is filled from ``config`` with dacite in strict mode (amqtt's
  ``plugins: {dotted.Class: {config}}``), unknown keys refused;
- it gets a copy of a ``BrokerContext`` whose ``config`` is that ``Config`` and whose ``logger`` is
  ``amqtt.broker.plugins.<ClassName>``, so an operator's logging set-up for amqtt keeps working;
- ``on_broker_pre_start``/``on_broker_post_start`` run at start, ``on_broker_pre_shutdown``/
  ``on_broker_post_shutdown`` and ``close`` at close, as amqtt's broker fires them.

What differs, on purpose: the ``Session`` a plugin is given carries the *real* client
(``remote_address``/``remote_port`` from the listener's :class:`~listeners.address.ClientAddress`,
never the proxy's), and is built afresh for each CONNECT (amqtt 0.12.1 kept a resumed session's
stale peer: README "How it is built", tests/integration/test_amqtt_faults.py). amqtt's broker
state (sessions, retained messages, ``broadcast_message``) is not reachable from the context:
this broker hosts plugins for authentication only, and a plugin that reaches for it fails with an
``AttributeError`` naming what
it wanted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import logging
from typing import TYPE_CHECKING, Any

from broker.auth.base import AuthError, Credentials, Outcome, Verdict
from broker.logs import Throttle

if TYPE_CHECKING:
    from broker.settings import AmqttPluginSettings

logger = logging.getLogger(__name__)

#: The amqtt release this module is written against (what its internals look like).
AMQTT_VERSION = "0.12.1"

#: The plugin namespace amqtt's broker uses: plugin loggers are its children, as in amqtt.
PLUGIN_NAMESPACE = "amqtt.broker.plugins"

#: Seconds a plugin's ``authenticate`` may take before the answer is ``ignore`` with ``error``. A
#: plugin calling a server (LDAP, HTTP, a database) without its own timeout must not hold a
#: CONNECT, and the client's slot, for ever; 10 s is twice our HTTP authenticator's default
#: request timeout, for the slower directory servers.
PLUGIN_TIMEOUT = 10.0


#: The broker events amqtt fires around a plugin's life (``amqtt.events.BrokerEvents`` values):
#: hooks ``on_<event>()`` with no arguments.
START_EVENTS = ("broker_pre_start", "broker_post_start")
STOP_EVENTS = ("broker_pre_shutdown", "broker_post_shutdown")

#: Keys this broker adds to ``session.attributes`` (namespaced, as amqtt asks of extensions): what
#: amqtt has no field for but a plugin may want.
ATTRIBUTE_PREFIX = "realip_broker."

#: What this module reads or writes on a ``Session`` (checked by :func:`amqtt_incompatibilities`).
_SESSION_FIELDS = ("remote_address", "remote_port", "client_id", "username", "password", "ssl_object")


class _NoBroker:
    """Stands for amqtt's ``Broker`` behind a plugin's ``BrokerContext``: there is none here."""

    def __getattr__(self, name: str) -> Any:
        # AttributeError, so that hasattr() on it answers False instead of raising.
        raise AttributeError(
            f"realip-broker hosts amqtt plugins for authentication only: amqtt's broker state "
            f"({name!r}) is not available to them"
        )


class AmqttPluginAuthenticator:
    """Hosts one amqtt ``BaseAuthPlugin`` as a link of the authentication chain.

    ``True`` from the plugin is ``allow``, ``False`` is ``deny``, ``None`` is ``ignore``; a plugin
    that raises, times out or answers anything else is ``ignore`` with ``error`` (logged, throttled).
    amqtt has no superuser notion: an ``allow`` is never a superuser.
    """

    name = "amqtt_plugin"
    #: The plugin is given the username with the password and decides on both.
    proves_username = True

    def __init__(self, settings: AmqttPluginSettings) -> None:
        self._settings = settings
        # Named after the class, so that two hosted plugins can be told apart in logs and metrics.
        self.name = f"amqtt_plugin:{settings.plugin.rsplit('.', 1)[-1]}"
        self._plugin: Any = None
        self._session_class: Any = None
        self._throttle = Throttle()

    async def start(self) -> None:
        """Import the plugin class, build its ``Config`` and context, make it and run its start hooks.

        Raises:
            AuthError: the installed amqtt lacks what this module relies on; the dotted path cannot
                be imported or is not a ``BaseAuthPlugin`` subclass; ``config`` has unknown keys,
                misses required ones or has values of the wrong type (named, values not quoted);
                the plugin's constructor or a start hook fails. The message names the plugin path.
        """
        path = self._settings.plugin
        problems = amqtt_incompatibilities()
        if problems:
            raise AuthError(
                f"{path}: the installed amqtt ({installed_amqtt_version()}) is not what "
                f"broker/auth/amqtt_plugin.py was written for ({AMQTT_VERSION}): {'; '.join(problems)}"
            )
        if _major_minor(installed_amqtt_version()) != _major_minor(AMQTT_VERSION):
            logger.warning(
                "amqtt_plugin %s: amqtt %s is installed, this broker was written against %s",
                path,
                installed_amqtt_version(),
                AMQTT_VERSION,
            )
        from amqtt.broker import BrokerContext
        from amqtt.plugins.base import BaseAuthPlugin
        from amqtt.session import Session

        plugin_class: Any = _import_class(path)
        if not (isinstance(plugin_class, type) and issubclass(plugin_class, BaseAuthPlugin)):
            raise AuthError(
                f"{path}: not an amqtt authentication plugin "
                "(a subclass of amqtt.plugins.base.BaseAuthPlugin)"
            )
        if not inspect.iscoroutinefunction(getattr(plugin_class, "authenticate", None)):
            raise AuthError(f"{path}: authenticate() is not a coroutine function")
        plugin_config = _build_config(path, plugin_class, self._settings.config)

        # As amqtt's PluginManager gives each plugin: a broker context with the plugin's own logger
        # and config.
        context = BrokerContext(_NoBroker())
        context.loop = asyncio.get_running_loop()
        context.logger = logging.getLogger(PLUGIN_NAMESPACE).getChild(plugin_class.__name__)
        context.config = plugin_config
        try:
            plugin = plugin_class(context)
        except Exception as exc:
            raise AuthError(f"{path}: the plugin could not be set up: {type(exc).__name__}: {exc}") from exc
        # amqtt refuses a plugin whose event hooks are not coroutines when it loads it.
        for event in (*START_EVENTS, *STOP_EVENTS):
            hook = getattr(plugin, f"on_{event}", None)
            if hook is not None and not inspect.iscoroutinefunction(hook):
                raise AuthError(f"{path}: on_{event}() is not a coroutine function")
        for event in START_EVENTS:
            hook = getattr(plugin, f"on_{event}", None)
            if hook is None:
                continue
            try:
                await hook()
            except Exception as exc:
                # Let it release what it took before failing (amqtt would leave it running).
                self._plugin = plugin
                await self.close()
                raise AuthError(f"{path}: on_{event}() failed: {type(exc).__name__}: {exc}") from exc
        self._plugin, self._session_class = plugin, Session

    async def authenticate(self, credentials: Credentials) -> Verdict:
        """Ask the plugin, with an amqtt ``Session`` describing the real client. Never raises."""
        plugin = self._plugin
        if plugin is None:
            return Verdict(Outcome.IGNORE, reason=f"{self.name} not started", error=True)
        if credentials.password is None:
            password = None
        else:
            try:
                password = credentials.password.decode("utf-8")
            except UnicodeDecodeError:
                # amqtt's plugins take the password as text; amqtt itself would hand them
                # "b'...'" (its decoder's fallback). Not ours to judge: another authenticator of the
                # chain may take binary passwords.
                return Verdict(Outcome.IGNORE, reason="password is not UTF-8 text")
        session = self._session(credentials, password)
        try:
            async with asyncio.timeout(PLUGIN_TIMEOUT):
                answer = await plugin.authenticate(session=session)
        except TimeoutError:
            self._throttle.log(
                logger,
                logging.WARNING,
                "%s: no answer within %.0f s for client %r from %s",
                self.name,
                PLUGIN_TIMEOUT,
                credentials.client_id,
                credentials.address.describe(),
            )
            return Verdict(Outcome.IGNORE, reason=f"{self.name} timed out", error=True)
        except Exception as exc:
            # The type and where it was raised, never the message: a plugin may well put the
            # password it was given into it.
            self._throttle.log(
                logger,
                logging.WARNING,
                "%s raised %s (at %s) for client %r from %s",
                self.name,
                type(exc).__name__,
                _raised_at(exc),
                credentials.client_id,
                credentials.address.describe(),
            )
            return Verdict(Outcome.IGNORE, reason=f"{self.name} raised {type(exc).__name__}", error=True)
        if answer is True:
            return Verdict(Outcome.ALLOW)
        if answer is False:
            return Verdict(Outcome.DENY, reason=f"{self.name} refused")
        if answer is None:
            return Verdict(Outcome.IGNORE)
        # amqtt takes any truthy value as a success; a plugin answering "deny" would be let in.
        self._throttle.log(
            logger,
            logging.WARNING,
            "%s answered a %s, not True, False or None, for client %r from %s",
            self.name,
            type(answer).__name__,
            credentials.client_id,
            credentials.address.describe(),
        )
        return Verdict(Outcome.IGNORE, reason=f"{self.name} answered a {type(answer).__name__}", error=True)

    async def close(self) -> None:
        """Run the plugin's shutdown hooks and ``close()``, as amqtt's broker does when it stops.

        Never raises: a failing hook is logged, and the next one still runs.
        """
        plugin, self._plugin = self._plugin, None
        if plugin is None:
            return
        for method in (*(f"on_{event}" for event in STOP_EVENTS), "close"):
            hook = getattr(plugin, method, None)
            if hook is None:
                continue
            try:
                await hook()
            except Exception as exc:
                logger.warning("%s: %s() failed: %s: %s", self.name, method, type(exc).__name__, exc)

    def _session(self, credentials: Credentials, password: str | None) -> Any:
        """A fresh amqtt ``Session`` for this CONNECT: the real client's address, never the proxy's."""
        address = credentials.address
        session = self._session_class()
        session.remote_address = address.ip
        session.remote_port = address.port
        session.client_id = credentials.client_id
        session.username = credentials.username
        session.password = password
        # amqtt puts the ssl.SSLObject of its own TLS socket here; TLS may have ended at a proxy,
        # and what we know of it is in the attributes below instead.
        session.ssl_object = None
        session.attributes.update(
            {
                f"{ATTRIBUTE_PREFIX}listener_id": credentials.listener_id,
                f"{ATTRIBUTE_PREFIX}proto_ver": credentials.proto_ver,
                f"{ATTRIBUTE_PREFIX}address_source": str(address.source),
                f"{ATTRIBUTE_PREFIX}proxy_address": address.proxy_ip,
                f"{ATTRIBUTE_PREFIX}proxy_port": address.proxy_port,
                f"{ATTRIBUTE_PREFIX}cert_common_name": credentials.cert_common_name,
            }
        )
        return session


def installed_amqtt_version() -> str:
    """The version of the installed amqtt, ``"none"`` when it cannot be imported. Never raises."""
    try:
        import amqtt
    except ImportError:
        return "none"
    return str(getattr(amqtt, "__version__", "unknown"))


def amqtt_incompatibilities() -> list[str]:
    """What this module relies on that the installed amqtt lacks; empty when all is there.

    Checked: the modules and classes imported, ``BaseAuthPlugin.authenticate``/``Config``/
    ``close``, ``BrokerContext(broker)`` giving ``loop``/``logger``/``config``, ``Session`` fields
    and ``attributes``, the broker event names, and dacite's strict ``from_dict``. Never raises.
    """
    problems: list[str] = []
    try:
        import dacite
        from amqtt.broker import BrokerContext
        from amqtt.events import BrokerEvents
        from amqtt.plugins.base import BaseAuthPlugin, BasePlugin
        from amqtt.session import Session
    except ImportError as exc:
        return [f"cannot import {exc.name or exc}"]
    if not issubclass(BaseAuthPlugin, BasePlugin):
        problems.append("BaseAuthPlugin is not a BasePlugin")
    for attribute in ("authenticate", "close", "Config"):
        if not hasattr(BaseAuthPlugin, attribute):
            problems.append(f"BaseAuthPlugin.{attribute} is missing")
    if not dataclasses.is_dataclass(getattr(BaseAuthPlugin, "Config", None)):
        problems.append("BaseAuthPlugin.Config is not a dataclass")
    authenticate = getattr(BaseAuthPlugin, "authenticate", None)
    if authenticate is not None and "session" not in inspect.signature(authenticate).parameters:
        problems.append("BaseAuthPlugin.authenticate() takes no 'session'")
    try:
        context = BrokerContext(_NoBroker())
    except Exception as exc:
        problems.append(f"BrokerContext(broker) fails: {type(exc).__name__}")
    else:
        for attribute in ("loop", "logger", "config"):
            if not hasattr(context, attribute):
                problems.append(f"BrokerContext.{attribute} is missing")
    session = Session()
    for attribute in _SESSION_FIELDS:
        if not hasattr(session, attribute):
            problems.append(f"Session.{attribute} is missing")
    if not isinstance(getattr(session, "attributes", None), dict):
        problems.append("Session.attributes is not a dict")
    events = {str(event.value) for event in BrokerEvents}
    problems.extend(f"event {name} is gone" for name in (*START_EVENTS, *STOP_EVENTS) if name not in events)
    if "strict" not in {f.name for f in dataclasses.fields(dacite.Config)}:
        problems.append("dacite.Config has no 'strict'")
    return problems


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def _import_class(path: str) -> Any:
    """The object named by ``package.module.Name``.

    Raises:
        AuthError: the module cannot be imported (whatever it raised while importing) or has no
            such attribute.
    """
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise AuthError(f"{path}: not a dotted path (package.module.PluginClass)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        contrib = path.startswith("amqtt.contrib.")
        hint = " (amqtt's contrib plugins need: pip install 'amqtt[contrib]')" if contrib else ""
        raise AuthError(f"{path}: cannot import {module_name}: {type(exc).__name__}: {exc}{hint}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise AuthError(f"{path}: module {module_name} has no {attribute!r}") from None


def _build_config(path: str, plugin_class: Any, data: dict[str, Any]) -> Any:
    """The plugin's ``Config`` dataclass made from ``data``, as amqtt does (dacite, strict).

    Raises:
        AuthError: ``Config`` is not a dataclass; ``data`` has unknown keys, lacks required ones or
            holds a value of the wrong type. Keys are named, values never quoted (one may be a
            secret).
    """
    import dacite

    config_class = getattr(plugin_class, "Config", None)
    if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
        raise AuthError(f"{path}: its Config is not a dataclass")
    known = [f.name for f in dataclasses.fields(config_class) if f.init]
    unknown = sorted(key for key in data if key not in known)
    if unknown:
        raise AuthError(
            f"{path}: unknown config key(s) {', '.join(map(repr, unknown))} "
            f"(it takes: {', '.join(known) or 'none'})"
        )
    try:
        return dacite.from_dict(data_class=config_class, data=data, config=dacite.Config(strict=True))
    except dacite.WrongTypeError as exc:
        raise AuthError(
            f"{path}: config key {exc.field_path!r} must be a {_type_name(exc.field_type)}"
        ) from None
    except dacite.MissingValueError as exc:
        raise AuthError(f"{path}: config key {exc.field_path!r} is required") from None
    except dacite.UnexpectedDataError as exc:  # a nested dataclass's unknown keys
        raise AuthError(f"{path}: unknown config key(s) {', '.join(map(repr, sorted(exc.keys)))}") from None
    except dacite.DaciteFieldError as exc:
        raise AuthError(f"{path}: config key {exc.field_path!r} is invalid") from None
    except (dacite.DaciteError, TypeError, ValueError, OSError) as exc:
        # TypeError/ValueError/OSError: the Config's own checks (__post_init__; amqtt's
        # ListenerConfig raises FileNotFoundError for a missing certificate).
        raise AuthError(f"{path}: invalid config: {type(exc).__name__}: {exc}") from None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _raised_at(exc: BaseException) -> str:
    """``file.py:line`` of the innermost frame of ``exc``'s traceback. Never raises."""
    tb = exc.__traceback__
    if tb is None:
        return "unknown"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
