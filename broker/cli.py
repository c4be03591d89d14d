"""``realip-broker``: serve, check-config, --version.

Exit codes: 0 success; 1 the broker failed at run time (a port in use...); 2 bad usage or an
invalid configuration (every problem is printed with its path).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

import yaml

from broker import __version__, logs
from broker import ctl as ctl_module
from broker.advice import config_warnings
from broker.errors import ConfigError, RealIPError
from broker.settings import LOG_LEVELS, Settings, default_settings, dump_settings, load_settings_file

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="realip-broker",
        description="An MQTT broker that knows each client's real address behind load balancers.",
    )
    parser.add_argument("--version", action="version", version=f"realip-broker {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the broker in the foreground")
    serve.add_argument("--config", metavar="FILE", help="YAML settings (default: the embedded defaults)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default: the config's log.level (info)")
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="asyncio",
        help="event loop: asyncio's own (the default), uvloop, or auto (uvloop when installed)",
    )

    ctl = commands.add_parser("ctl", help="talk to a running broker's admin API")
    ctl_module.add_arguments(ctl)

    check = commands.add_parser(
        "check-config", help="validate a settings file and print the effective config"
    )
    check.add_argument("file", metavar="FILE")
    return parser


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory for ``auto`` / ``uvloop`` when it is installed, else ``None``
    (asyncio's own loop)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _load(path: str | None) -> Settings:
    return default_settings() if path is None else load_settings_file(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Print the effective config (exit 0) or every problem with its path (exit 2)."""
    try:
        settings = _load(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    for warning in config_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"# {args.file}: valid; the effective configuration follows")
    print(yaml.safe_dump(dump_settings(settings), sort_keys=False), end="")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the broker until SIGTERM/SIGINT."""
    try:
        settings = _load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    try:
        logs.configure(args.log_level or settings.log.level, settings.log.format, settings.log.file)
    except OSError as exc:
        print(f"log.file: cannot open {settings.log.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    from broker.app import BrokerApp  # the whole engine: only when serving

    loop_factory = event_loop_factory(args.loop)
    if loop_factory is None and args.loop == "uvloop":
        print("--loop uvloop: uvloop is not installed (pip install uvloop)", file=sys.stderr)
        return EXIT_USAGE
    logging.getLogger("broker").info("event loop: %s", "uvloop" if loop_factory else "asyncio")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(BrokerApp(settings, args.config).run())
    except RealIPError as exc:
        logging.getLogger("broker").error("%s", exc)
        return EXIT_FAILURE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``realip-broker`` command."""
    args = build_parser().parse_args(argv)
    handlers = {"serve": cmd_serve, "check-config": cmd_check_config, "ctl": ctl_module.run}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
