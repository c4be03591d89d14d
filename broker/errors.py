"""The one exception tree of realip-broker.

Every error the project raises on purpose derives from :class:`RealIPError`. The classes marked
``[listeners]`` are defined in :mod:`listeners.errors` (the lowest layer, which imports nothing from
:mod:`broker`) and re-exported here, so ``from broker.errors import ProxyProtocolError`` works; the
others are defined here::

    RealIPError                  [listeners] the root
    ├── ConfigError              invalid settings; carries every problem with its path
    ├── AddressError             [listeners] a client address could not be learned safely
    │   ├── ProxyProtocolError   [listeners] a PROXY protocol v1/v2 header is malformed or refused
    │   └── ForwardedHeaderError [listeners] an address header (X-Forwarded-For...) is malformed
    └── AdminError               the admin API or ``realip-broker ctl`` could not do what was asked

``AddressError`` subclasses carry a short machine-readable ``reason`` (used as a
metrics label and in the audit log) besides the human-readable message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from listeners.errors import AddressError, ForwardedHeaderError, ProxyProtocolError, RealIPError

__all__ = [
    "AddressError",
    "AdminError",
    "ConfigError",
    "ConfigProblem",
    "ForwardedHeaderError",
    "ProxyProtocolError",
    "RealIPError",
]


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


class AdminError(RealIPError):
    """The admin API or ``realip-broker ctl`` could not do what was asked."""
