"""The ``osad`` command: one subcommand per job.

Each package contributes its subcommands through a ``register(subparsers)`` function in its
``cli`` module; those modules import nothing heavy at import time, so ``osad --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from osad.runtime.config import ConfigError

# Modules that contribute subcommands, in --help order.
_COMMAND_MODULES = (
    "osad.up",
    "osad.runtime.cli",
    "osad.collector.cli",
    "osad.featurizer.cli",
    "osad.detector.cli",
    "osad.alerter.cli",
    "osad.workload",
    "osad.agreement",
)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``osad`` parser: every subcommand the installed packages contribute (tests walk it)."""
    p = argparse.ArgumentParser(
        prog="osad",
        description="Per-process anomaly detection for Linux: eBPF collector -> featurizer (MSCRED signature "
        "matrices) -> detector (MSCRED, compressed sensing) -> alerter, over Kafka.",
        epilog="Every --option can also be set as an environment variable, OSAD_<OPTION> (a few that mean "
        "something else elsewhere: OSAD_<COMMAND>_<OPTION>); a flag wins. 'osad COMMAND --help' lists a "
        "command's options and names each one's variable.",
    )
    from osad import __version__

    p.add_argument("--version", action="version", version=f"osad {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue  # that package has no CLI (yet)
            raise
        try:
            m.register(sub)
        except ImportError as e:
            # One package's missing dependency must not take the other commands down with it.
            print(f"osad: warning: the commands of {mod.split('.')[0]} are unavailable: {e}", file=sys.stderr)
    return p


def available_commands() -> set[str]:
    """The subcommands this installation has (a package whose dependencies are missing contributes none)."""
    for a in build_parser()._actions:
        if isinstance(a, argparse._SubParsersAction):
            return set(a.choices)
    return set()


def _config_file(argv: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """The --config FILE (or $OSAD_CONFIG) of a command line, and the subcommand names before the first option:
    the file is read while that command's parser is built (runtime.config.ConfigFile)."""
    import os

    path = os.environ.get("OSAD_CONFIG") or None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    commands = []
    for a in argv:
        if a.startswith("-"):
            break
        commands.append(a)
    return path, tuple(commands[:2])


def main(argv: list[str] | None = None) -> int:
    from osad.runtime.config import use_config_file

    use_config_file(*_config_file(sys.argv[1:] if argv is None else list(argv)))
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except ConfigError as e:
        print(f"osad: configuration error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"osad {args.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
