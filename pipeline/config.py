"""Typed stage configs: dataclasses loaded from YAML/TOML/JSON files with command-line overrides.

Precedence: dataclass defaults < config file < flags given on the command line. Every field is
checked on load and an error names the field; the resolved config is saved beside each artifact.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from pipeline.files import read_json, write_json_atomic

Config = TypeVar("Config")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the field and the source."""


def with_absolute_paths(config: Config, **also: Any) -> Config:
    """Every path field made absolute (a saved config is read back from other folders), plus `also`."""
    paths = {f.name: Path(value).resolve() for f in dataclasses.fields(config)
             if "Path" in str(f.type) and (value := getattr(config, f.name)) is not None}
    return dataclasses.replace(config, **paths, **also)


def device_problem(device: str) -> str | None:
    """What is wrong with a `--device` value on this machine (None: usable): checked before any work."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        return f"device must be cpu, cuda or cuda:N, got {device!r}"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"device {device!r}: torch sees no CUDA device here (torch {torch.__version__})"
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        return f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def output_problem(name: str, path: Path | None, folder: bool = True) -> str | None:
    """What is wrong with an output path (None: usable): a file where a folder goes, or the other way round, or a
    file among the folders above it (a mistyped path: nothing could be made there)."""
    if path is None:
        return None
    if not Path(path).exists():
        above = next((parent for parent in Path(path).parents if parent.exists()), None)
        return None if above is None or above.is_dir() else f"{name} {path}: {above} is a file, not a folder"
    if Path(path).is_dir() == folder:
        return None
    return f"{name} {path} is {'a file' if folder else 'a folder'}; it must be {'a folder' if folder else 'a file name'}"


def foreign_output(folder: Path | None, own_kind: str) -> str | None:
    """What in an output folder shows that another kind of skillpipe output lives there, None if nothing: a feature
    cache's cache.json, a fit-head grid's grid.json, or a config.json that another stage saved (in a folder that is
    not a cache: an existing cache stays extractable whatever else its folder holds). `own_kind`: the
    writing stage's config class name ("FeatureCache" for extract). Writing there would mix with its files or
    replace them (a finetune run's config.json over a grid's). An EgoExo4D download root is refused as well."""
    if folder is None:
        return None
    folder = Path(folder)
    if is_a_download_root(folder):  # the data itself: a run's files would sit among the takes' folders
        return "annotations/ and takes/: it is an EgoExo4D download root"
    if (folder / "cache.json").is_file():  # a cache: anything else there is the user's (a grid kept beside it, say)
        return None if own_kind == "FeatureCache" else "cache.json: it is a feature cache"
    if own_kind != "FitHeadConfig" and (folder / "grid.json").is_file():
        return "grid.json: it is a fit-head grid"
    if not (folder / "config.json").is_file():
        return None
    try:
        saved = read_json(folder / "config.json")
    except (OSError, ValueError):
        saved = None
    kind = saved.get("kind") if isinstance(saved, dict) else None
    return None if kind == own_kind else f"a config.json of {kind or 'another program'}"


# how a stage's help marks a field without default (typer's own [required] would refuse a value given in --config only;
# square brackets would be read as rich markup)
REQUIRED_HELP = "(required: here or in --config)"


def required_fields(cls: type) -> list[str]:
    """The fields of config `cls` that have no default."""
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def flag_for(cls: type, name: str) -> str | None:
    """The command-line flag that sets field `name` of the stage config `cls`: the field's "flag" metadata where the
    flag is named otherwise (`--fusion`, repeated, fills `fusions`), else `--name-with-hyphens`; None for no field."""
    spec = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    return spec and spec.metadata.get("flag", "--" + name.replace("_", "-"))


def is_a_download_root(folder: Path) -> bool:
    """Whether `folder` holds an EgoExo4D download (its annotations/ and takes/ folders)."""
    return (Path(folder) / "annotations").is_dir() and (Path(folder) / "takes").is_dir()


def read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: unsupported suffix {path.suffix!r} (use .yaml, .toml or .json)")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: cannot parse: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of field names to values")
    return data


def load_config(cls: type[Config], path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build `cls` from defaults, then the file at `path`, then the non-None `overrides`."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        data = read_config_file(path)
        kind = data.pop("kind", cls.__name__)  # the resolved config a stage saved beside its output is a config file too
        if kind != cls.__name__:
            raise ConfigError(f"config file {path} is of kind {kind!r}; this stage reads {cls.__name__!r}")
        for key, value in data.items():
            values[key], sources[key] = value, f"config file {path}"
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key], sources[key] = value, "command line"
    return build_config(cls, values, sources)


def build_config(cls: type[Config], values: dict[str, Any], sources: dict[str, str] | None = None) -> Config:
    sources = sources or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = sorted({sources.get(key, "values given") for key in unknown})
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown} in {', '.join(where)}; known fields: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    coerced = {}
    for key, value in values.items():
        try:
            coerced[key] = _coerce(value, hints[key])
        except (TypeError, ValueError) as err:
            where = sources.get(key, "value")
            raise ConfigError(f"{cls.__name__}.{key} from {where}: {err}") from None
    missing = [name for name in required_fields(cls) if name not in coerced]
    if missing:
        flags = ", ".join(flag_for(cls, name) for name in missing)
        raise ConfigError(f"{cls.__name__}: required field(s) not set: {missing} (give {flags} or set them in --config)")
    try:
        return cls(**coerced)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cls.__name__}: {err}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def save_config(config: Any, path: Path) -> None:
    write_json_atomic(path, {"kind": type(config).__name__, **config_to_dict(config)})


def read_saved_config(cls: type[Config], path: Path) -> Config:
    data = dict(read_json(path))
    data.pop("kind", None)
    return build_config(cls, data, {key: f"saved config {path}" for key in data})


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        (item_type, *_) = typing.get_args(hint)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        return tuple(_coerce(item, item_type) for item in value)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {list(choices)}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string
            try:
                return float(value)
            except ValueError:
                raise TypeError(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise TypeError(f"expected a path, got {value!r}")
        return Path(value)
    raise TypeError(f"unsupported config type {hint!r}")
