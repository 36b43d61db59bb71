"""The detector package's subcommands: ``osad evaluate``, ``osad train``, ``osad detect``.

Each command lives in its own module (evaluate_cli, train_cli, service_cli) with its typed
configuration; nothing heavy (torch, scipy, matplotlib) is imported when they register, so
``osad --help`` stays fast. A command whose module cannot be imported does not take the others
down: each is imported on its own.
"""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the detector's subcommands to ``osad``."""
    _register_evaluate(subparsers)  # first: needs nothing beyond core, so it registers even if another command cannot
    _register_train(subparsers)
    _register_detect(subparsers)


def _register_evaluate(sub) -> None:
    from .evaluate_cli import register_evaluate

    register_evaluate(sub)


def _register_train(sub) -> None:
    from .train_cli import register_train

    register_train(sub)


def _register_detect(sub) -> None:
    from .service_cli import register_detect

    register_detect(sub)
