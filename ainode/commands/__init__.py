"""``ainode`` subcommand groups beyond the core ones in :mod:`ainode.cli`.

Each module exposes ``register(subparsers) -> {command: handler}``, the same protocol as the
``ainode.commands`` entry points; a handler is ``handler(settings, args) -> exit status``.
"""

from __future__ import annotations

from ainode.commands import demo, labels, models, retention, users

GROUPS: list = [
    models.register,
    labels.register,
    users.register,
    retention.register,
    demo.register,
]
