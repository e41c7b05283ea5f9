"""Write node settings as the TOML file an administrator would, for CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

from node.settings import Settings


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; TOML has no null: "" means none
        items = (
            f"{json.dumps(k)} = {_toml_value('' if v is None else v)}" for k, v in value.items()
        )
        return "{" + ", ".join(items) + "}"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML string


def write_config(settings: Settings, path: Path) -> Path:
    """Dump ``settings`` to a TOML file at ``path``."""
    data = settings.model_dump(mode="json", exclude_none=True)
    peers = data.pop("peers")
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items()]
    for peer in peers:
        lines.append("\n[[peers]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in peer.items() if v is not None]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def format1(info):
    """``info`` (a ModelInfo) as a bundle of format 1 says it: no calibration, operating
    point, OOD statistics or gate data (what the demo's model.json describes of its own
    files)."""
    return info.replace(format_version=1, calibration={}, operating_point={}, ood={}, gate={})
