"""Documentation stays true: every config key is in config.toml, every command in the README."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pydantic import BaseModel

from pacs_sentinel.daemon.cli import build_parser
from pacs_sentinel.daemon.config import Config

REPO = Path(__file__).resolve().parents[1]
#: Keys whose value is a free mapping (attribute -> values, AE title -> seconds), not a table.
MAPPING_KEYS = frozenset({"match", "match_regex", "quiet_seconds_by_calling_ae"})


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for attribute, field in model.model_fields.items():
        name = field.alias or attribute  # the key as written in config.toml
        # list[Model] and Model | None document the model's own keys.
        models = [t for t in getattr(field.annotation, "__args__", (field.annotation,))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            models = [field.annotation]
        if models:
            keys |= _schema_keys(models[0], f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _toml_keys(data: dict, prefix: str = "") -> set[str]:  # type: ignore[type-arg]
    keys = set()
    for name, value in data.items():
        if isinstance(value, dict) and name not in MAPPING_KEYS:
            keys |= _toml_keys(value, f"{prefix}{name}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                keys |= _toml_keys(item, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_every_config_key_is_in_the_shipped_config_toml_with_a_comment() -> None:
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    # Keys of optional tables are documented as commented-out examples ("# key = value # ...").
    uncommented = "\n".join(re.sub(r"^# (?=\[|\w+\s*=)", "", line) for line in text.splitlines())
    assert _schema_keys(Config) == _toml_keys(tomllib.loads(uncommented))
    for line in uncommented.splitlines():
        if re.match(r"^\w+\s*=", line):
            assert "#" in line, f"config.toml key without a comment: {line}"


def test_every_command_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    subparsers = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in subparsers.choices:
        assert f"sentinel {command}" in readme, f"command {command!r} is not documented in README.md"


def test_readme_opens_with_the_two_setup_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]
