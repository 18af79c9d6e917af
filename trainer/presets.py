"""YAML presets in `configs/`, dotted `key=value` overrides, and one-line validation errors.

The presets ship as package data: `trainer/presets_data` is a link to the top-level `configs/` folder (the
single source of truth), so a wheel holds real copies under `trainer/presets_data/` and an editable install or a
plain checkout reads `configs/` itself. They are found through `importlib.resources`, never relative to the
source tree. The override parser and the validation helpers are generic over pydantic models, so the
evaluator's benchmark configs parse `key=value` exactly as the run config does.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from trainer.config import TrainConfig

#: Folder of the YAML presets inside the installed `trainer` package (package data).
PRESETS_FOLDER = "presets_data"
M = TypeVar("M", bound=BaseModel)


class _Yaml12ishLoader(yaml.SafeLoader):
    """YAML with only true/false as booleans: `progress=off` stays the string 'off' (YAML 1.1 says False)."""


_Yaml12ishLoader.yaml_implicit_resolvers = {
    key: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12ishLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.2 floats without a dot (`optim.lr=5e-4`), which YAML 1.1 reads as strings
_Yaml12ishLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12ishLoader)  # a SafeLoader subclass: no arbitrary objects


class ConfigError(ValueError):
    """A config that cannot be used; `field` names the offending dotted key when one is to blame."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def preset_dir() -> Path:
    """The installed presets (package data of `trainer`), as a folder on disk."""
    folder = files("trainer") / PRESETS_FOLDER
    if not isinstance(folder, Path) or not folder.is_dir():
        raise ConfigError(f"the presets are not installed as files: {folder} (reinstall the package)")
    return folder


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


#: What a preset is called: a file name in the presets folder, or one in a subfolder (`sweeps/k_ablation`).
PRESET_NAME = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)?$")


def preset_path(name: str) -> Path:
    """A preset of the registry by name, never an arbitrary path (what the service accepts from users)."""
    candidate = preset_dir() / f"{name}.yaml"
    if PRESET_NAME.match(name) is None or not candidate.is_file():
        raise ConfigError(f"no preset named {name!r}; presets: {', '.join(preset_names())}", field="preset")
    return candidate


def resolve_preset(name_or_path: str | Path) -> Path:
    """A preset name (`tiny_cpu`), a file in the presets (`sweeps/x.yaml`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        return path
    names = [str(path), path.name] if path.suffix else [f"{path}.yaml", f"{path.name}.yaml"]
    for name in names:
        candidate = preset_dir() / name
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no config file or preset named {str(name_or_path)!r}; presets: {', '.join(preset_names())}")


_PARSED: dict[tuple[str, int, int], Any] = {}


def _parsed_shared(path: Path) -> Any:
    """A file's YAML, parsed once per (path, mtime, size): the service resolves a preset on every submit, and
    parsing dominated a submit's CPU. The cached object itself: read it, never change it."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED:
        if len(_PARSED) > 256:  # edited files leave stale keys behind; a bounded cache forgets them
            _PARSED.clear()
        _PARSED[key] = parse_yaml(path.read_text())
    return _PARSED[key]


def _parsed(path: Path) -> Any:
    """A copy of the file's cached YAML, so the cache never sees a caller's edits."""
    return copy.deepcopy(_parsed_shared(path))


def read_yaml(path: Path, _depth: int = 0) -> dict[str, Any]:
    """Load a YAML preset, following its optional `_base_`: the name of a file next to it, or of a preset of
    the registry, that it extends (never a path: a config cannot make anything read files elsewhere)."""
    try:
        data = _parsed(path) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path.name}: invalid YAML: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return deep_merge(read_yaml(_base_path(path, base, _depth), _depth + 1), data)


def _base_path(path: Path, base: Any, depth: int) -> Path:
    name = str(base).removesuffix(".yaml").removesuffix(".yml")
    if PRESET_NAME.match(name) is None or "/" in name or depth >= 8:
        raise ConfigError(f"{path.name}: _base_ must name a preset (at most 8 deep), not {str(base)[:100]!r}")
    sibling = path.parent / f"{name}.yaml"
    return sibling if sibling.is_file() else preset_path(name)


def preset_version(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of a preset file and of each preset it extends: what `read_yaml(path)` depends on,
    so a cache keyed by it sees every edit."""
    version: list[tuple[str, int, int]] = []
    for depth in range(9):
        stat = path.stat()
        version.append((str(path), stat.st_mtime_ns, stat.st_size))
        try:
            data = _parsed_shared(path)
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            raise ConfigError(f"{path.name}: invalid YAML: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
        base = data.get("_base_") if isinstance(data, dict) else None
        if base is None:
            break
        path = _base_path(path, base, depth)
    return tuple(version)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _section(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (also through `X | None`), or None for a leaf value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def _known_keys(model: type[BaseModel], path: list[str]) -> None:
    """Refuse an override path that names no config field (typos must not pass silently)."""
    current: type[BaseModel] | None = model
    for depth, key in enumerate(path):
        if current is None or key not in current.model_fields:
            dotted = ".".join(path[: depth + 1])
            choices = ", ".join(sorted(current.model_fields)) if current is not None else ""
            raise ConfigError(
                f"unknown config key {dotted!r}" + (f"; expected one of: {choices}" if choices else ""), field=dotted
            )
        current = _section(current.model_fields[key].annotation)


def apply_overrides(
    data: Mapping[str, Any], overrides: Iterable[str], model: type[BaseModel] = TrainConfig
) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a plain dict, each key checked against `model`'s fields.

    Values are YAML with only true/false as booleans (`crops.global_scale=[0.4,1.0]`; `x=off` stays 'off'),
    an empty value is None. The one parser of the trainer, the evaluator and the service.
    """
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        path = key.split(".")
        _known_keys(model, path)
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        except (ValueError, RecursionError) as exc:  # 5,000-digit numbers, 5,000-deep nesting
            raise ConfigError(f"override {key}: value cannot be parsed ({type(exc).__name__})", field=key) from exc
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def format_validation_error(error: ValidationError) -> tuple[str, str | None]:
    """One line naming the first offending field, plus that field's dotted name."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    named = message.split(" ", 1)[0].rstrip(":")
    if named.replace(".", "").replace("_", "").isalnum() and (not loc or named.startswith(loc + ".")):
        loc = named  # a cross-field check names the exact (sub-)field it refuses
    extra = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if loc and not message.startswith(loc):
        return f"{loc}: {message}{extra}", loc
    return f"{message}{extra}", loc or None


def validate_model(model: type[M], data: Mapping[str, Any]) -> M:
    """Validate a plain dict into `model`, raising ConfigError with a one-line reason and the field to blame."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        message, field = format_validation_error(exc)
        raise ConfigError(message, field=field) from exc


def validate_config(data: Mapping[str, Any]) -> TrainConfig:
    """Validate a plain dict into a TrainConfig, raising ConfigError with a one-line reason."""
    return validate_model(TrainConfig, data)


def override_model(config: M, overrides: Iterable[str]) -> M:
    """A copy of a validated config with `key=value` overrides applied and validated again."""
    model = type(config)
    return validate_model(model, apply_overrides(config.model_dump(mode="json"), overrides, model))


def load_config(preset: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Preset (name or path; None = built-in defaults) plus overrides, validated."""
    data = read_yaml(resolve_preset(preset)) if preset is not None else {}
    return validate_config(apply_overrides(data, overrides))


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
