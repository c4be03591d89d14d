"""The one exception tree of realip-broker.

Every error the project raises on purpose derives from :class:`RealIPError`::

    RealIPError
    ├── ConfigError              invalid settings; carries every problem with its path
    ├── EngineError              the MQTT engine (amqtt) is not the one we were written for, or failed
    ├── AddressError             a client address could not be learned safely
    │   ├── ProxyProtocolError   a PROXY protocol v1/v2 header is malformed or refused
    │   └── ForwardedHeaderError an X-Forwarded-For / X-Real-IP / Forwarded header is malformed
    └── AdminError               the admin API or ``realip-broker ctl`` could not do what was asked

``AddressError`` subclasses carry a short machine-readable ``reason`` (used as a
metrics label and in the audit log) besides the human-readable message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class RealIPError(Exception):
    """Base class of every error raised on purpose by realip-broker."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem found in the settings: where it is and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(RealIPError):
    """The settings are invalid. ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: Sequence[ConfigProblem], source: str = "") -> None:
        self.problems = tuple(problems)
        self.source = source
        where = f"{source}: " if source else ""
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{where}{len(self.problems)} configuration error(s):\n{lines}")


class EngineError(RealIPError):
    """The MQTT engine is missing, of another version than the one pinned, or failed to start."""


class AddressError(RealIPError):
    """The client's address could not be learned safely; the connection must be refused.

    ``reason`` is a short snake_case code (a metrics label); the message says what was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class ProxyProtocolError(AddressError):
    """A PROXY protocol header is malformed, unsupported or not allowed here."""


class ForwardedHeaderError(AddressError):
    """An address header of a WebSocket upgrade request is malformed."""


class AdminError(RealIPError):
    """The admin API or ``realip-broker ctl`` could not do what was asked."""
