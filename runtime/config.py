"""Configuration from flags and environment variables, validated, with errors that say what to fix.

Every option ``--some-option`` can also be set as ``OSAD_SOME_OPTION``; a flag wins over the
environment, the environment over the default. Services declare options with :func:`option`
and read the validated result as an argparse namespace.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration value is wrong; the text names the flag, the variable and what to do."""


def env_name(flag: str) -> str:
    return "OSAD_" + flag.lstrip("-").replace("-", "_").upper()


def option(parser: argparse.ArgumentParser, flag: str, *, type: Callable[[str], Any] = str, default: Any = None,
           help: str = "", choices=None, check: Callable[[Any], str | None] | None = None, **kw) -> None:
    """Add ``flag`` whose default comes from ``OSAD_<FLAG>`` when set, validated by ``type``/``check``."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if raw is not None and raw != "":
        try:
            default = type(raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"environment variable {env}={raw!r} is not valid for {flag}: {e}") from None
        if choices is not None and default not in choices:
            raise ConfigError(f"environment variable {env}={raw!r}: choose one of {', '.join(map(str, choices))}")
    shown = f" (env {env}; default: {default})" if default not in (None, "") else f" (env {env})"
    parser.add_argument(flag, type=_checked(type, check, flag), default=default, help=help + shown,
                        choices=choices, **kw)


def _checked(type_, check, flag):
    def conv(s: str):
        try:
            v = type_(s)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{s!r} is not valid: {e}") from None
        if check:
            msg = check(v)
            if msg:
                raise argparse.ArgumentTypeError(msg)
        return v
    conv.__name__ = getattr(type_, "__name__", "value")
    return conv


def positive(v) -> str | None:
    return None if v > 0 else "must be greater than 0"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def int_list(s: str) -> list[int]:
    vals = [int(x) for x in s.replace(" ", "").split(",") if x]
    if not vals:
        raise ValueError("give comma-separated integers, e.g. 10,30,60")
    return vals


def add_kafka_options(p: argparse.ArgumentParser, group_default: str | None = None) -> None:
    """The options every Kafka-connected service has."""
    option(p, "--bootstrap", default="127.0.0.1:9092",
           help="Kafka bootstrap servers, comma-separated host:port")
    option(p, "--topic-prefix", default="", help="prefix for every topic name and consumer group (several "
           "installations on one cluster)")
    if group_default is not None:
        option(p, "--group", default=group_default, help="consumer group; replicas in one group share partitions")
    option(p, "--metrics-port", type=int, default=0, check=non_negative,
           help="serve Prometheus /metrics and /healthz on this port (0: off)")
    option(p, "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")


def apply_common(args: argparse.Namespace) -> None:
    """Act on the common options (topic prefix, logging)."""
    import logging

    if getattr(args, "topic_prefix", None) is not None and args.topic_prefix != "":
        os.environ["OSAD_TOPIC_PREFIX"] = args.topic_prefix
    logging.basicConfig(level=getattr(args, "log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
