"""Experiment configs: load a YAML study config and pick out its parts by name.

The schema ships inside the package (``ctpo/schemas/config.schema.yaml``): the workflow validates with it,
and so does `load_config`, so `ctpo <step> --config experiments/tiny.yaml` by hand, from a checkout or an
installed wheel, fails the same way on a bad key.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA = resources.files("ctpo") / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A study config is missing something or names something it does not define."""


def load_config(path: str | Path, validate: bool = True) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass --config experiments/tiny.yaml or a copy"
        )
    with path.open() as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(config).__name__}")
    if validate:
        validate_config(config, source=str(path))
    return config


@functools.cache
def schema() -> dict[str, Any]:
    """The study-config schema (JSON Schema, as YAML), from the package."""
    return yaml.safe_load(SCHEMA.read_text())


def validate_config(config: dict[str, Any], source: str = "config") -> None:
    """Check ``config`` against the schema; a `ConfigError` lists each problem with the key it is at."""
    validator = jsonschema.validators.validator_for(schema())(schema())  # the draft the schema names
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors[:10]:
            where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"  {where}: {err.message}")
        raise ConfigError(f"{source} is not a valid study config:\n" + "\n".join(lines))


def section(config: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    """``config[key][name]`` with an error that lists what the config does define."""
    table = config.get(key) or {}
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ConfigError(f"{key} entry {name!r} is not defined in the config (defined: {known})")
    return dict(table[name] or {})


def train_section(config: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """The config's ``train:`` section with the model's own ``train:`` keys over it (for example a smaller
    RL learning rate for a wider tiny model); just ``train:`` when ``model`` is None."""
    out = dict(config.get("train") or {})
    if model is not None:
        own = section(config, "models", model).get("train") or {}
        if "backend" in own:  # the workflow picks one backend for the whole study; never ignore it silently
            raise ConfigError(
                f"models.{model}.train.backend: the trainer backend is chosen for the whole study; "
                "set train.backend instead and remove it here"
            )
        out.update(own)
    return out


def results_dir(config: dict[str, Any]) -> Path:
    return Path(config.get("results_dir", f"results/{config.get('study', 'study')}"))


def run_matrix(config: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Expand ``runs`` blocks into (model, method, seed) triples, in config order, without duplicates."""
    out: list[tuple[str, str, int]] = []
    for block in config.get("runs", []):
        for model in block["models"]:
            section(config, "models", model)
            for method in block["methods"]:
                section(config, "methods", method)
                for seed in block.get("seeds", config.get("seeds", [0])):
                    if (model, method, seed) not in out:
                        out.append((model, method, int(seed)))
    return out
