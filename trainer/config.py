"""Typed, strict configuration shared by every entry point.

A config is a dataclass schema (the types and defaults), overlaid in this order:

1. ``configs/<entry>.yaml``                       the entry's base file (tokenizer, generator, shard, ...)
2. ``configs/<entry>/<field>/<value>.yaml``      config groups: an overlay chosen by a field's value,
   e.g. ``tokenizer.recipe=decoder_finetune`` applies ``configs/tokenizer/recipe/decoder_finetune.yaml``
3. section ``<entry>:`` of ``configs/experiments/<experiment>.yaml``   when ``experiment=<name>`` is given
4. ``key=value`` overrides from the command line (OmegaConf dotlist syntax)

Everything is validated against the schema before any work starts: an unknown key, a value of the
wrong type or a bad choice is one line on stderr naming the key and the valid choices, exit code 2.
``--help`` prints the merged config.

Schemas may check cross-field rules in ``__post_init__`` by raising :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

T = TypeVar("T")

CONFIG_DIR_ENV = "TITOK_CONFIG_DIR"
EXIT_CONFIG_ERROR = 2

# Keys whose values never reach logs or MLflow (matched against the last path component).
# A key is secret when its last part contains one of these words, or ends in "token"/"credentials"
# (auth_token, session_token) -- but not model keys like num_latent_tokens, token_size, tokenizer.
_SECRET_KEY_PATTERN = re.compile(r"(secret|password|passwd|access_key|api_key|private_key)|((^|_)(token|credentials?)$)",
                                 re.I)
_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_TOKEN",
                    "MLFLOW_TRACKING_PASSWORD")
MASK = "***"

# Config groups: fields whose value selects an overlay file (see the module docstring).
GROUPS: dict[str, tuple[str, ...]] = {"tokenizer": ("tokenizer.recipe",)}

# Entry name -> "module:Schema". Experiment files may only have sections for these entries.
ENTRIES: dict[str, str] = {
    "tokenizer": "trainer.schema:TokenizerTrainConfig",
    "generator": "trainer.schema:GeneratorTrainConfig",
    "shard": "data_prep.schema:ShardConfig",
    "pretokenize": "data_prep.schema:PretokenizeConfig",
    "demo_data": "data_prep.schema:DemoDataConfig",
    "eval": "evals.schema:EvalConfig",
    "reconstruct": "trainer.reconstruct:ReconstructConfig",
    "sample": "trainer.sample:SampleConfig",
    "demo": "cluster.demo:DemoConfig",
}


class ConfigError(ValueError):
    """A config that cannot be used. ``str(err)`` is the one line shown to the user."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error: {key}: {message}" if key else f"config error: {message}")
        self.key = key


def config_dir() -> Path:
    """The ``configs/`` folder: ``$TITOK_CONFIG_DIR`` or the one at the repository root."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


def available_experiments() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "experiments").glob("*.yaml"))


def entry_schema(entry: str) -> type:
    """The schema class registered for an entry name."""
    import importlib

    module, _, name = ENTRIES[entry].partition(":")
    return getattr(importlib.import_module(module), name)


def build_config(entry: str, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Merge schema <- base YAML <- experiment overlay <- overrides; return the validated dataclass.

    Raises :class:`ConfigError` for anything invalid.
    """
    merged = _merge(entry, schema, overrides)
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except MissingMandatoryValue as err:
        key = _full_key(err)
        raise ConfigError(key, f"is required (set {key}=...)") from None
    except OmegaConfBaseException as err:
        # __post_init__ errors surface wrapped; unwrap ours.
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise _translate(err, schema) from None


def load_config(entry: str, schema: type[T], argv: Sequence[str] | None = None, *,
                description: str = "") -> T:
    """Command-line front end of :func:`build_config` for entry points.

    Handles ``--help``/``-h`` (prints the merged config, exits 0) and turns a :class:`ConfigError`
    into one line on stderr and exit code 2, before any work starts.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in args)
    overrides = [a for a in args if a not in ("-h", "--help")]
    try:
        if wants_help:
            print(help_text(entry, schema, overrides, description))
            raise SystemExit(0)
        return build_config(entry, schema, overrides)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def help_text(entry: str, schema: type, overrides: Sequence[str] = (), description: str = "") -> str:
    merged = _merge(entry, schema, overrides)
    lines = []
    if description:
        lines += [description.strip(), ""]
    lines += [
        "usage: key=value overrides (OmegaConf dotlist), e.g. seed=1 experiment=<name>",
        f"experiments: {', '.join(available_experiments()) or '(none)'}",
        f"merged config for '{entry}' (schema defaults <- configs/{entry}.yaml <- experiment <- overrides):",
        "",
        OmegaConf.to_yaml(merged, resolve=False).rstrip(),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Merging


def _merge(entry: str, schema: type, overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError("", f"expected key=value, got {item!r}")
    try:
        # OmegaConf parses the right-hand side as YAML (numbers, lists, null), keeping URLs as strings.
        override_cfg = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError("", f"cannot parse overrides: {err.msg if hasattr(err, 'msg') else err}") from None

    experiment = override_cfg.get("experiment") if "experiment" in override_cfg else None
    base_layers: list[tuple[str, Any]] = []
    base_file = config_dir() / f"{entry}.yaml"
    if base_file.exists():
        base_layers.append((str(base_file), _read_yaml(base_file)))
        if experiment is None:  # the entry's YAML may choose an experiment itself
            experiment = base_layers[0][1].get("experiment")
    experiment_layers: list[tuple[str, Any]] = []
    if experiment is not None:
        experiment_layers.append((f"experiment {experiment}", _experiment_section(str(experiment), entry)))
    layers = base_layers + experiment_layers

    node = _merge_layers(schema, layers, override_cfg)
    group_layers = []
    for key in GROUPS.get(entry, ()):
        value = OmegaConf.select(node, key)
        value = value.value if isinstance(value, enum.Enum) else value
        path = config_dir() / entry / key.rsplit(".", 1)[-1] / f"{value}.yaml"
        if value is not None and path.exists():
            group_layers.append((f"{entry}/{key.rsplit('.', 1)[-1]}/{value}.yaml", _read_yaml(path)))
    if group_layers:  # base first, then the group overlays, then the experiment
        node = _merge_layers(schema, base_layers + group_layers + experiment_layers, override_cfg)
    return node


def _merge_layers(schema: type, layers: list[tuple[str, Any]], override_cfg: DictConfig) -> DictConfig:
    node = OmegaConf.structured(schema)
    OmegaConf.set_struct(node, True)
    for source, layer in layers:
        if not layer:
            continue
        node = _merge_one(node, OmegaConf.create(layer), schema, source)
    return _merge_one(node, override_cfg, schema, "command line")


def _merge_one(node: DictConfig, layer: DictConfig, schema: type, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(node, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _translate(err, schema, source) from None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path}: invalid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level")
    return data


def _experiment_section(name: str, entry: str) -> dict:
    path = config_dir() / "experiments" / f"{name}.yaml"
    if not path.exists():
        choices = available_experiments()
        hint = _close(name, choices)
        raise ConfigError("experiment", f"{name!r} is not a valid choice; valid: {', '.join(choices) or '(none defined)'}{hint}")
    data = _read_yaml(path)
    unknown = sorted(set(data) - set(ENTRIES))
    if unknown:
        raise ConfigError("experiment", f"{path}: unknown section(s) {unknown}; valid: {', '.join(ENTRIES)}")
    section = data.get(entry) or {}
    if not isinstance(section, dict):
        raise ConfigError("experiment", f"{path}: section {entry!r} must be a mapping")
    return section


# ----------------------------------------------------------------------------------------------
# Errors


def _full_key(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
    return str(key)


def _translate(err: OmegaConfBaseException, schema: type, source: str = "") -> ConfigError:
    key = _full_key(err)
    where = f" (from {source})" if source and source != "command line" else ""
    msg = (getattr(err, "msg", None) or str(err)).split("\n")[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        parent, _, leaf = key.rpartition(".")
        valid = _valid_keys(schema, parent)
        hint = _close(leaf, valid)
        where_parent = f" under '{parent}'" if parent else ""
        return ConfigError(key, f"unknown key{where}; valid keys{where_parent}: {', '.join(valid)}{hint}")
    if isinstance(err, ValidationError):
        choices = _enum_choices(schema, key)
        value = _bad_value(msg)
        if choices:
            hint = _close(str(value), choices) if value is not None else ""
            shown = f"{value!r}" if value is not None else "value"
            return ConfigError(key, f"{shown} is not a valid choice{where}; valid: {', '.join(choices)}{hint}")
        conversion = re.search(r"Value '([^']*)' of type '\w+' could not be converted to (\w+)", msg)
        if conversion:
            return ConfigError(key, f"{conversion.group(1)!r} is not a valid {conversion.group(2).lower()}{where}")
        return ConfigError(key, f"{msg}{where}")
    return ConfigError(key, f"{msg}{where}")


def _bad_value(msg: str) -> str | None:
    match = re.search(r"(?:Invalid value|Value) '([^']*)'", msg)
    return match.group(1) if match else None


def _schema_field(schema: type, dotted: str) -> Any:
    """The dataclass field type at ``dotted`` (None if unknown); list indices are skipped."""
    current: Any = schema
    ftype: Any = None
    for part in [p for p in re.split(r"[.\[\]]", dotted) if p and not p.isdigit()]:
        if not dataclasses.is_dataclass(current):
            return None
        hints = typing.get_type_hints(current)
        if part not in hints:
            return None
        ftype = hints[part]
        current = _unwrap_optional(ftype)
    return ftype


def _unwrap_optional(tp: Any) -> Any:
    args = getattr(tp, "__args__", None)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _enum_choices(schema: type, key: str) -> list[str]:
    tp = _unwrap_optional(_schema_field(schema, key))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [m.name for m in tp]
    return []


def _valid_keys(schema: type, parent: str) -> list[str]:
    node: Any = schema if not parent else _unwrap_optional(_schema_field(schema, parent))
    if dataclasses.is_dataclass(node):
        return sorted(f.name for f in dataclasses.fields(node))
    return []


def _close(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ----------------------------------------------------------------------------------------------
# Output helpers


def to_container(cfg: Any) -> Any:
    """Plain dict/list form of a config dataclass (enums as their values)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return container


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, secrets masked (what gets saved beside checkpoints)."""
    return yaml.safe_dump(mask_secrets(to_container(cfg)), sort_keys=False)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY_PATTERN.search(key.rsplit(".", 1)[-1]))


def mask_secrets(value: Any, key: str = "") -> Any:
    """Mask values under secret-looking keys and any occurrence of secret environment values."""
    if isinstance(value, dict):
        return {k: mask_secrets(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(v, key) for v in value]
    if key and is_secret_key(key) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return redact(value)
    return value


def redact(text: str) -> str:
    """Replace the values of secret environment variables wherever they occur in ``text``."""
    for var in _SECRET_ENV_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, MASK)
    return text


def flatten(cfg: Any, max_value_len: int = 500) -> dict[str, str]:
    """``{"trainer.max_steps": "100", ...}`` with secrets masked: the MLflow params of a run."""
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            text = "null" if value is None else (str(value) if not isinstance(value, (list, tuple))
                                                 else yaml.safe_dump(list(value), default_flow_style=True).strip())
            out[prefix] = text[:max_value_len]

    walk(mask_secrets(to_container(cfg)), "")
    return out


__all__ = [
    "ENTRIES", "entry_schema", "ConfigError", "build_config", "load_config", "help_text", "available_experiments", "config_dir",
    "to_container", "to_yaml", "flatten", "mask_secrets", "redact", "is_secret_key", "MASK",
    "DictConfig", "ListConfig",
]
