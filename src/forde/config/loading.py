"""Configs from YAML files, built-in names and `key=value` overrides, merged onto the schema by OmegaConf and
checked; and what of a config defines its run (`identity`), which a re-launch must keep."""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from forde.config.schema import TrainConfig
from forde.config.validation import validate
from forde.errors import ConfigError, one_line
from forde.trust import refuse_code_from_file

BUILTIN_CONFIGS = "configs"


def builtin_config_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in resources.files("forde").joinpath(BUILTIN_CONFIGS).iterdir()
        if p.name.endswith(".yaml")
    )


def read_config_yaml(source: str | Path) -> DictConfig:
    """A YAML file, or a built-in config by name, as an untyped DictConfig."""
    path = Path(source)
    if not path.exists() and not str(source).endswith((".yaml", ".yml")):
        builtin = resources.files("forde").joinpath(BUILTIN_CONFIGS, f"{source}.yaml")
        if builtin.is_file():
            cfg = OmegaConf.create(builtin.read_text())
            assert isinstance(cfg, DictConfig), builtin  # the package's own configs are mappings
            return cfg
        raise ConfigError(
            f"config '{source}' is neither a file nor a built-in config; built-ins: {', '.join(builtin_config_names())}"
        )
    if not path.exists():
        raise ConfigError(f"config file '{source}' does not exist")
    cfg = load_yaml(path, "config file")
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} holds a list; a config file is a mapping of keys, e.g. `optim: {{lr: 0.1}}`")
    return cfg


MAX_YAML_BYTES = 1 << 20  # a config or study file is a few KB
MAX_YAML_DEPTH = 32  # nested mappings and lists; configs use 3
MAX_YAML_NODES = 100_000  # values once YAML's aliases are expanded (a billion laughs stops here)


def _check_size(text: str, path: Path, what: str) -> None:
    """One line for a file deeper or (aliases expanded) bigger than any config is, before it is built: building it
    would overflow Python's stack or take all memory. Read as events, which does neither."""
    import yaml

    too = f"{path} is not a {what} forde reads:"
    fix = f"give the path of a {what}"
    depth, anchored, counts = 0, dict[str, int](), [0]  # counts: nodes in each open collection, the document's
    open_anchors: list[str | None] = []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise ConfigError(f"{too} nested {depth} levels deep at line {line}, over {MAX_YAML_DEPTH}; {fix}")
            counts.append(1)
            open_anchors.append(event.anchor)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
            size, anchor = counts.pop(), open_anchors.pop()
            counts[-1] += size
            if anchor:
                anchored[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            counts[-1] += 1
            if event.anchor:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            counts[-1] += anchored.get(event.anchor or "", 1)
        if counts[-1] > MAX_YAML_NODES or sum(counts) > MAX_YAML_NODES:
            raise ConfigError(f"{too} over {MAX_YAML_NODES:,} values once its aliases are expanded; {fix}")


def load_yaml(path: Path, what: str) -> DictConfig | ListConfig:
    """A YAML file (`what`: a config file, a study file) of keys or a list; a syntax error, a file that reads as
    one value (any text file does), or one too large or too deeply nested to be a config becomes one line naming
    the file, the place and the fix."""
    import yaml

    try:
        if path.stat().st_size > MAX_YAML_BYTES:  # not even read
            raise ConfigError(
                f"{path} is not a {what} forde reads: {path.stat().st_size:,} bytes, over the {MAX_YAML_BYTES:,} a "
                f"{what} may have; give the path of a {what}"
            )
        text = path.read_text(errors="replace")
        _check_size(text, path, what)
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # as OmegaConf reads it: the same error messages
        root = yaml.compose(text, Loader=loader)  # the document's shape, without building it
        if root is not None and not isinstance(root, (yaml.MappingNode, yaml.SequenceNode)):
            raise ConfigError(
                f"{path} is not a {what}: its YAML is one value, not a mapping of `key: value` lines; "
                f"give the path of a {what}"
            )
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        lines = text.splitlines()
        if mark and mark.line < len(lines) and lines[mark.line][mark.column : mark.column + 1] == "\t":
            problem += " (a tab; YAML indents with spaces only)"
        raise ConfigError(
            f"{path}: YAML syntax error{where}: {problem}; fix that line "
            "(`key: value` pairs, consistent indentation, closed brackets and quotes)"
        ) from None


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        value = getattr(node, f.name)
        if is_dataclass(value):
            keys.extend(_all_keys(value, key + "."))
    return keys


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        known = _all_keys(TrainConfig())
        leaf = key.split(".")[-1]
        guess = difflib.get_close_matches(key, known, n=1) or difflib.get_close_matches(
            leaf, [k.split(".")[-1] for k in known], n=1
        )
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        return f"unknown config key '{key}'{hint} (`forde config` prints every key)"
    if isinstance(err, ValidationError):
        default = OmegaConf.select(OmegaConf.structured(TrainConfig), key, default=None)
        if isinstance(default, ListConfig):
            example = ",".join(map(str, default)) if len(default) else "..."
            return f"'{key}' must be a list, e.g. {key}=[{example}]; {str(err).splitlines()[0]}"
        hint = f"; e.g. {key}={default}" if isinstance(default, (bool, int, float, str)) else ""
        return f"bad value for '{key}': {str(err).splitlines()[0]}{hint}"
    return f"config error at '{key}': {str(err).splitlines()[0]}"


def merge(base: DictConfig | dict | None, *layers: DictConfig | dict | list[str]) -> DictConfig:
    """Schema <- base <- layers (dicts, DictConfigs or dotted `key=value` lists), type-checked."""
    typed = isinstance(base, DictConfig) and OmegaConf.get_type(base) is TrainConfig  # merged with the schema already
    try:
        merged = base if typed else OmegaConf.merge(OmegaConf.structured(TrainConfig), base or {})
        for layer in layers:
            parts = _parse_overrides(layer) if isinstance(layer, list) else [("", layer)]
            for item, part in parts:
                try:
                    merged = OmegaConf.merge(merged, part)
                except TypeError as err:  # OmegaConf: a mapping where the schema has a list, or the reverse
                    what = f"override '{item}'" if item else "a value"
                    raise ConfigError(
                        f"{what} is of the wrong kind ({one_line(err)}): lists are written key=[a,b], mappings "
                        "key={a: 1}; `forde config` prints every key with its value"
                    ) from None
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    assert isinstance(merged, DictConfig)  # merged onto the schema, a mapping
    return merged.copy() if merged is base else merged  # a config of its own: resolving it must not change `base`


def _parse_overrides(items: list[str]) -> list[tuple[str, DictConfig]]:
    """`key=value` overrides, each parsed on its own so that a bad one is named."""
    import yaml

    parsed = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' has no value; write it as {item}=VALUE")
        try:
            parsed.append((item, OmegaConf.from_dotlist([item])))
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or one_line(err)
            raise ConfigError(
                f"override '{item}': its value is not valid YAML ({problem}); write lists as key=[a,b] and "
                "mappings as key={a: 1}, quoting the whole override in the shell"
            ) from None
    return parsed


def load_config(
    source: str | Path | None = None, overrides: list[str] | None = None, trust_code: bool = False
) -> TrainConfig:
    """Read a YAML file or built-in config name, apply overrides, validate, return the typed config.

    A YAML file that chooses code to run (`code_from_file`) is refused unless `trust_code` (`--trust-code`)."""
    base = read_config_yaml(source) if source is not None else None
    cfg = to_train_config(merge(base, overrides or []))
    if source is not None and Path(source).exists() and not trust_code:  # a file, not a built-in config
        refuse_code_from_file(str(source), cfg.model, overrides or [])
    return cfg


def to_train_config(cfg: DictConfig) -> TrainConfig:
    try:
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    assert isinstance(obj, TrainConfig)  # merge() typed cfg with the schema
    validate(obj)
    return obj


def to_dict(cfg: TrainConfig) -> dict:
    as_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(as_dict, dict)  # a dataclass becomes a mapping
    return as_dict


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Keys that say where things are or how a run is carried out, not what is trained: a run directory (or a
# study) stays resumable when they change, e.g. after moving the data or changing GPUs.
NOT_IDENTITY = ("run", "data.root", "data.download", "eval.corrupted_root", "eval.generate_corrupted", "device")


def identity(cfg: TrainConfig) -> dict[str, Any]:
    """The flat `dotted.key -> value` settings that define what a run trains, without paths and run options."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if key in NOT_IDENTITY:
                continue
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                flat[key] = v

    walk(to_dict(cfg), "")
    return flat


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every identity key that differs."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
