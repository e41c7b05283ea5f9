"""The node's log lines: text for a person, or JSON (one object a line) for a log shipper.

A JSON line has ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, and the
study keys known where it was logged — the study's UID and the node's own ids, set with
:func:`study_keys` around the work on one study or given as ``extra=`` — never a patient's
name or ID (no log call of the node carries them).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

STUDY_KEYS = (
    "study_instance_uid",
    "study_id",
    "analysis_id",
    "report_id",
    "series_instance_uid",
    "sop_instance_uid",
)

_keys: contextvars.ContextVar[tuple[tuple[str, object], ...]] = contextvars.ContextVar(
    "ainode_study_keys", default=()
)


@contextlib.contextmanager
def study_keys(**keys: object) -> Iterator[None]:
    """Put ``keys`` (of :data:`STUDY_KEYS`) on every JSON line logged inside the block."""
    unknown = set(keys) - set(STUDY_KEYS)
    if unknown:
        raise ValueError(f"not study keys: {', '.join(sorted(unknown))}")
    known = {**dict(_keys.get()), **{k: v for k, v in keys.items() if v is not None}}
    token = _keys.set(tuple(known.items()))
    try:
        yield
    finally:
        _keys.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, study keys, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(dict(_keys.get()))
        for key in STUDY_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(log_format: str) -> None:
    """Every handler of the root logger (``ainode``'s stderr) writes ``log_format``: ``json``
    lines, or the ``text`` it was set up with."""
    if log_format != "json":
        return
    formatter = JsonFormatter()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
