"""Named bundles of allow rules shipped with the package (`presets = [...]` in a policy)."""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources
from typing import NamedTuple


class Preset(NamedTuple):
    name: str
    description: str
    allow: tuple[str, ...]


@cache
def presets() -> dict[str, Preset]:
    text = resources.files(__package__).joinpath("presets.toml").read_text(encoding="utf-8")
    return {name: Preset(name, table["description"], tuple(table["allow"]))
            for name, table in tomllib.loads(text).items()}
