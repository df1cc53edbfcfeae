"""Typed configuration: dataclasses are the schema, OmegaConf merges YAML and `key=value` overrides.

Every check runs before any data is loaded or any model is built, and every failure names the
field and how to fix it.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A bad configuration value, raised before any training starts."""


class MissingDataError(ConfigError):
    """A dataset or prepared input is not on disk: a problem of the machine, not of the config (sweeps retry
    such trials instead of counting them as failed)."""


class DataError(MissingDataError):
    """A dataset or prepared input on disk that cannot be used as it is (unreadable, cut short, of the wrong
    shape, or refused as unsafe): like a missing one, a problem of the machine, found before any training."""


CORRUPTION_SELECTIONS = ("all", "benchmark", "none")
KERNEL_METHODS = ("forde", "rde_weight", "rde_function")  # methods with a median-heuristic kernel


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar100 | tinyimagenet | a name given to `forde data import-folder`
    root: str = "${oc.env:FORDE_DATA,data}"  # datasets, imported folders, PCA caches and -C sets live here
    download: bool = False  # download CIFAR-10/100 or Tiny-ImageNet into `root` when it is missing
    val_fraction: float = 0.0  # share of the training set held out for validation (model selection, pruning)
    split_seed: int = 0  # the train/validation split and the subsets below depend on this seed only
    train_subset: int | None = None  # train on this many training samples, a class-stratified draw (null = all)
    test_subset: int | None = None  # evaluate on this many test samples, the same draw for every corrupted set
    augment: bool = True  # random crop (padding 4) and horizontal flip on the device; images only
    on_device: bool = True  # keep the whole training set on the training device as uint8


Execution = Literal["loop", "vmap"]
RESNET18_BLOCKS = (2, 2, 2, 2)
BLOCK_MODELS = ("resnet18", "preact_resnet18")  # the models whose depth model.blocks sets
BUILTIN_MODELS = ("mlp", "resnet18", "preact_resnet18", "wrn16_4")
MODEL_FORMS = "mlp, resnet18, preact_resnet18, wrn16_4, timm:NAME or PACKAGE.MODULE:CALLABLE"
_CALLABLE_NAME = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)")


@dataclass
class ModelConfig:
    name: str = "mlp"  # a built-in network, timm:NAME, or PACKAGE.MODULE:CALLABLE (your own; see docs/models.md)
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of timm's or your network's constructor
    width: int = (
        64  # channels of the first residual stage (64 = the paper's nets; 16 = the small ResNet of the benchmarks)
    )
    hidden: list[int] = field(default_factory=lambda: [128, 128, 128])  # MLP hidden layer sizes
    blocks: list[int] = field(
        default_factory=lambda: list(RESNET18_BLOCKS)
    )  # residual blocks per stage ([1,1,1,1]: ResNet10)
    zero_init_classifier: bool = False  # the release's classifier layer starts at zero (weights and bias)
    execution: Literal["auto", "loop", "vmap"] = (
        "auto"  # members one after another, or vectorised (same results); auto: the device's default
    )


GradTarget = Literal["logit", "log_prob"]
MedianMode = Literal["per_column", "all_pairs"]
AlphaMix = Literal["precision", "lengthscale"]


@dataclass
class MethodConfig:
    name: Literal["de", "forde", "rde_weight", "rde_function", "lit"] = "forde"
    alpha: float = 1.0  # lengthscale mix between identity (0) and PCA (1) lengthscales, see alpha_mix
    alpha_mix: AlphaMix = "precision"  # mix Sigma^-1 (w = 1-a + a*lambda) or Sigma (w = 1/(1-a + a/lambda))
    bandwidth_scale: float = 1.0  # multiplies the median-heuristic bandwidth
    bandwidth: float | None = None  # a fixed bandwidth instead of the median heuristic
    median: MedianMode = "per_column"  # median over i per kernel column j (release), or all (i, j) (paper)
    eps: float = 1e-12  # s = g / sqrt(|g|^2 + eps^2)
    grad_target: GradTarget = "logit"  # which true-class output is differentiated w.r.t. x
    repulsion_every: int = 1  # FoRDE: add the repulsion (scaled by k) on every k-th step only; plain steps between
    repulsion_subset: float = 1.0  # FoRDE: share of each batch whose input gradients build the kernel
    repulsion_ramp_start: float = 1.0  # FoRDE: repulsion weight in epoch 0, falling linearly to 1 ...
    repulsion_ramp_epochs: int = 0  # ... over this many epochs (the release's first commit: 100 over 80)
    lit_weight: float = 1.0  # LIT: weight of the squared-cosine penalty on input gradients


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: int = 300
    lr_ratio: float = 0.01  # final lr = lr * lr_ratio
    decay_start: float = 0.5  # fraction of training where the linear decay starts
    decay_end: float = 0.9  # fraction of training where it reaches lr * lr_ratio
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr over this many epochs


@dataclass
class EvalConfig:
    batch_size: int = 1000
    every: int = 1  # evaluate the validation (else test) set every N epochs
    corruptions: list[str] = field(default_factory=lambda: ["all"])  # all | benchmark | none | explicit names
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    corrupted_root: str | None = None  # where the -C set lives (default: <data.root>/<dataset>-C)
    generate_corrupted: bool = True  # build the -C set locally when it is missing
    grad_samples: int = 1000  # samples per set used for the input-gradient diversity metric (0 = off)


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online when logged in, else offline
    project: str = "forde"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds to wait for an online W&B run to start before logging offline instead


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str | None = None  # run directory name; default: <dataset>-<method>-M<size>-seed<seed>
    resume: bool = True  # continue from the run directory's last checkpoint when there is one
    restart: bool = (
        False  # the run directory holds another config (e.g. a diverged lr): start over, old files kept in previous-N/
    )
    progress: bool = True  # per-epoch progress bar
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CudaConfig:
    """Speed settings that only CUDA devices have (ignored on the CPU)."""

    tf32: bool = True  # TF32 tensor cores in convolutions (PyTorch's default); matrix products stay IEEE float32
    cudnn_benchmark: bool = True  # cuDNN times its algorithms for each new input shape and keeps the fastest
    graphs: bool = False  # capture each kind of training step (forward + backward) once as a CUDA graph and replay it


# What `auto` means for precision, channels_last and model.execution on each kind of device: the fastest
# measured setting that passes the equivalence tests. CPU: benchmarks/README.md. CUDA: to be set from the
# table that benchmarks/gpu_check.sh writes (benchmarks/results/step_time-cuda.md); until GPU timings exist
# it is PyTorch's plain setting.
DEVICE_DEFAULTS = {
    "cpu": {"precision": "fp32", "channels_last": False, "execution": "loop"},
    "cuda": {"precision": "fp32", "channels_last": False, "execution": "loop"},
}


@dataclass
class TrainConfig:
    seed: int = 0
    ensemble_size: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 autocast needs CUDA; auto: the device's default
    channels_last: bool | None = None  # channels-last memory format for convolutional nets; null: the device's default
    cuda: CudaConfig = field(default_factory=CudaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


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


def load_yaml(path: Path, what: str) -> DictConfig | ListConfig:
    """A YAML file (`what`: a config file, a study file) of keys or a list; a syntax error, or a file that reads as
    one value (any text file does), becomes one line naming the file, the place and the fix."""
    import yaml

    try:
        text = path.read_text(errors="replace")
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
        hint = f"; e.g. {key}={default}" if isinstance(default, (bool, int, float, str)) else ""
        return f"bad value for '{key}': {str(err).splitlines()[0]}{hint}"
    return f"config error at '{key}': {str(err).splitlines()[0]}"


def merge(base: DictConfig | dict | None, *layers: DictConfig | dict | list[str]) -> DictConfig:
    """Schema <- base <- layers (dicts, DictConfigs or dotted `key=value` lists), type-checked."""
    typed = isinstance(base, DictConfig) and OmegaConf.get_type(base) is TrainConfig  # merged with the schema already
    try:
        merged = base if typed else OmegaConf.merge(OmegaConf.structured(TrainConfig), base or {})
        for layer in layers:
            if isinstance(layer, list):
                for item in layer:
                    if "=" not in item:
                        raise ConfigError(f"override '{item}' has no value; write it as {item}=VALUE")
                layer = OmegaConf.from_dotlist(layer)
            merged = OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    assert isinstance(merged, DictConfig)  # merged onto the schema, a mapping
    return merged.copy() if merged is base else merged  # a config of its own: resolving it must not change `base`


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


def model_source(name: str) -> tuple[str, str | None, str | None]:
    """("builtin", None, None), ("timm", None, NAME) or ("callable", MODULE, CALLABLE) for a model.name, read from
    the text alone; ConfigError for any other form, and for modules of Python's standard library, which hold no
    networks but functions that must never be called by a config (os:system, subprocess:run, shutil:rmtree)."""
    if name in BUILTIN_MODELS:
        return "builtin", None, None
    if name.startswith("timm:"):
        _check(len(name) > len("timm:"), "model.name", name, "names no timm model", "set e.g. model.name=timm:resnet18")
        return "timm", None, name[len("timm:") :]
    found = _CALLABLE_NAME.fullmatch(name)
    _check(
        found is not None,
        "model.name",
        name,
        f"is none of {MODEL_FORMS}",
        "set e.g. model.name=resnet18, model.name=timm:resnet18 or model.name=my_models:ViT",
    )
    assert found is not None  # _check raised otherwise
    module, attr = found.groups()
    _check(
        module.split(".")[0] not in sys.stdlib_module_names,
        "model.name",
        name,
        f"{module} is part of Python's standard library, which holds no networks",
        "name a network class or a "
        "function that builds one, from your own module or an installed package (e.g. model.name=my_models:ViT)",
    )
    return "callable", module, attr


TRUST_FIX = "pass --trust-code if you trust this file"


def runs_code(model: ModelConfig) -> bool:
    """Whether building `model` runs code its config chooses: a PACKAGE.MODULE:CALLABLE, or a timm model given
    keyword arguments (checkpoint_path, pretrained_cfg_overlay and the like make timm read files). The built-in
    networks and timm's registered architectures without arguments run none."""
    kind = model_source(model.name)[0]
    return kind == "callable" or (kind == "timm" and bool(model.kwargs))


def code_from_file(model: ModelConfig, overrides: list[str]) -> str | None:
    """The field (model.name or model.kwargs) through which a file, not the command line, chooses code that
    building `model` runs; None when the command line gave it (the user's own consent) or no code runs. A timm
    name only picks a registered architecture: what matters there is who gave the arguments."""
    if not runs_code(model):
        return None
    given = OmegaConf.to_container(OmegaConf.from_dotlist([o for o in overrides if o.startswith("model")]))
    typed = given.get("model") if isinstance(given, dict) else None
    typed = typed if isinstance(typed, dict) else {}
    if typed.get("name") != model.name and model_source(model.name)[0] == "callable":
        return "model.name"
    return None if (typed.get("kwargs") or {}) == model.kwargs else "model.kwargs"


def refuse_code_from_file(where: str, model: ModelConfig, overrides: list[str]) -> None:
    """One line, before anything is imported or built: the file `where` names code to run (see code_from_file)."""
    key = code_from_file(model, overrides)
    if key == "model.name":
        raise ConfigError(f"{where}: model.name {model.name!r} names code to run; {TRUST_FIX}")
    if key == "model.kwargs":
        raise ConfigError(
            f"{where}: model.kwargs {model.kwargs} are arguments of the code {model.name!r} runs; {TRUST_FIX}"
        )


def _check(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {rule}; {fix}")


def validate(cfg: TrainConfig) -> None:
    """Range and consistency checks that types alone cannot express."""
    from forde.data.corruption_names import CORRUPTIONS  # names only: cheap, no image libraries
    from forde.names import RULE, is_path_component

    m, o, d, e = cfg.method, cfg.optim, cfg.data, cfg.eval
    _check(
        is_path_component(d.name),
        "data.name",
        d.name,
        f"{RULE}: it names a folder under data.root",
        "set e.g. data.name=cifar10",
    )
    _check(
        cfg.run.name is None or is_path_component(cfg.run.name),
        "run.name",
        cfg.run.name,
        f"{RULE}: it names the run directory inside run.out_dir",
        "set e.g. run.name=my-run (or leave it unset)",
    )
    _check(
        cfg.ensemble_size >= 1,
        "ensemble_size",
        cfg.ensemble_size,
        "must be at least 1",
        "set ensemble_size=10 (the paper's size)",
    )
    validate_method(m, cfg.ensemble_size)
    _check(o.lr > 0, "optim.lr", o.lr, "must be positive", "set optim.lr=0.1")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must lie in [0, 1)", "set optim.momentum=0.9")
    _check(
        not o.nesterov or o.momentum > 0,
        "optim.nesterov",
        o.nesterov,
        "Nesterov needs momentum > 0",
        "set optim.momentum=0.9 or optim.nesterov=false",
    )
    _check(
        o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be non-negative", "set optim.weight_decay=5e-4"
    )
    _check(o.batch_size >= 1, "optim.batch_size", o.batch_size, "must be at least 1", "set optim.batch_size=128")
    _check(
        o.epochs >= 1,
        "optim.epochs",
        o.epochs,
        "must be at least 1",
        "set a positive number, e.g. optim.epochs=300 (the paper's)",
    )
    _check(0 < o.lr_ratio <= 1, "optim.lr_ratio", o.lr_ratio, "must lie in (0, 1]", "set optim.lr_ratio=0.01")
    _check(
        0 <= o.decay_start <= o.decay_end <= 1,
        "optim.decay_start/decay_end",
        (o.decay_start, o.decay_end),
        "need 0 <= decay_start <= decay_end <= 1",
        "set optim.decay_start=0.5 optim.decay_end=0.9",
    )
    _check(
        0 <= o.warmup_epochs < o.epochs,
        "optim.warmup_epochs",
        o.warmup_epochs,
        "must lie in [0, epochs)",
        "set optim.warmup_epochs=0",
    )
    _check(
        0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must lie in [0, 1)", "set data.val_fraction=0.1"
    )
    _check(cfg.model.width >= 1, "model.width", cfg.model.width, "must be at least 1", "set model.width=64")
    _check(
        all(h >= 1 for h in cfg.model.hidden) and len(cfg.model.hidden) >= 1,
        "model.hidden",
        cfg.model.hidden,
        "needs at least one positive layer size",
        "set model.hidden=[128,128,128]",
    )
    mc = cfg.model
    kind = model_source(mc.name)[0]
    _check(
        kind != "builtin" or not mc.kwargs,
        "model.kwargs",
        mc.kwargs,
        f"passes arguments to the constructor of a timm or your own network, not to the built-in {mc.name}",
        "remove model.kwargs, or set model.width / model.hidden / model.blocks",
    )
    reserved = ("num_classes", "in_chans") if kind == "timm" else ("num_classes",)
    taken = [k for k in mc.kwargs if k in reserved]
    _check(
        not taken,
        "model.kwargs",
        mc.kwargs,
        f"sets {', '.join(taken)}, which the dataset sets",
        f"remove model.kwargs.{taken[0] if taken else ''}",
    )
    _check(
        len(mc.blocks) >= 1 and all(b >= 1 for b in mc.blocks),
        "model.blocks",
        mc.blocks,
        "needs at least one stage of at least one block",
        "set model.blocks=[2,2,2,2] (ResNet18)",
    )
    _check(
        mc.name in BLOCK_MODELS or tuple(mc.blocks) == RESNET18_BLOCKS,
        "model.blocks",
        mc.blocks,
        f"sets the depth of {' and '.join(BLOCK_MODELS)} only, not of model.name = {mc.name}",
        "leave model.blocks at [2,2,2,2]",
    )
    for key, n in (("data.train_subset", d.train_subset), ("data.test_subset", d.test_subset)):
        _check(n is None or n >= 1, key, n, "must be a positive sample count or null (all samples)", f"set {key}=null")
    _check(
        cfg.run.wandb.init_timeout > 0,
        "run.wandb.init_timeout",
        cfg.run.wandb.init_timeout,
        "must be positive",
        "set run.wandb.init_timeout=30",
    )
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be at least 1", "set eval.batch_size=1000")
    _check(e.every >= 1, "eval.every", e.every, "must be at least 1", "set eval.every=1")
    _check(
        e.grad_samples >= 0, "eval.grad_samples", e.grad_samples, "must be non-negative", "set eval.grad_samples=1000"
    )
    _check(
        len(e.severities) >= 1 and all(1 <= s <= 5 for s in e.severities),
        "eval.severities",
        e.severities,
        "must be a non-empty list of values in 1..5",
        "set eval.severities=[1,2,3,4,5]",
    )
    unknown = [c for c in e.corruptions if c not in CORRUPTIONS and c not in CORRUPTION_SELECTIONS]
    _check(
        not unknown,
        "eval.corruptions",
        e.corruptions,
        f"unknown corruption(s) {unknown}",
        f"use all, benchmark, none or names from {', '.join(CORRUPTIONS)}",
    )
    _check(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
        "device",
        cfg.device,
        "must be auto, cpu, cuda or cuda:N",
        "set device=auto",
    )
    _check(
        cfg.precision != "bf16" or cfg.device != "cpu",
        "precision",
        cfg.precision,
        "bf16 autocast is for CUDA devices",
        "set precision=fp32 (or auto) on the CPU",
    )
    _check(
        not cfg.cuda.graphs or cfg.device != "cpu",
        "cuda.graphs",
        cfg.cuda.graphs,
        "CUDA graphs need a CUDA device",
        "set cuda.graphs=false on the CPU",
    )
    _check(
        not (cfg.cuda.graphs and ramped(m)),
        "cuda.graphs",
        cfg.cuda.graphs,
        "a replayed step repeats its captured repulsion weight, so it cannot follow method.repulsion_ramp_epochs",
        "set cuda.graphs=false, or method.repulsion_ramp_epochs=0",
    )


def ramped(m: MethodConfig) -> bool:
    """Whether the repulsion weight changes over epochs."""
    return m.repulsion_ramp_epochs > 0 and m.repulsion_ramp_start != 1.0


def validate_method(m: MethodConfig, ensemble_size: int | None, prefix: str = "method.") -> None:
    """The method's checks; `ensemble_size` None skips the one that needs it, `prefix` names the keys in errors
    (`method.` in configs, none for the Python API's keyword arguments)."""

    def check(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
        _check(ok, prefix + key, value, rule, fix.format(p=prefix))

    check(
        0.0 <= m.alpha <= 1.0,
        "alpha",
        m.alpha,
        "must lie in [0, 1] (0 = identity, 1 = PCA lengthscales)",
        "set e.g. {p}alpha=0.4",
    )
    check(m.bandwidth_scale > 0, "bandwidth_scale", m.bandwidth_scale, "must be positive", "set {p}bandwidth_scale=1.0")
    check(
        m.bandwidth is None or m.bandwidth > 0,
        "bandwidth",
        m.bandwidth,
        "must be positive or null (median heuristic)",
        "set {p}bandwidth=null" if prefix else "set bandwidth=None",
    )
    check(m.eps > 0, "eps", m.eps, "must be positive", "set {p}eps=1e-12")
    check(
        m.median in get_args(MedianMode),
        "median",
        m.median,
        f"must be one of {get_args(MedianMode)}",
        "set {p}median=per_column",
    )
    check(
        m.grad_target in get_args(GradTarget),
        "grad_target",
        m.grad_target,
        f"must be one of {get_args(GradTarget)}",
        "set {p}grad_target=logit",
    )
    if m.name in KERNEL_METHODS and m.bandwidth is None and ensemble_size is not None:
        _check(
            ensemble_size >= 2,
            "ensemble_size",
            ensemble_size,
            f"{m.name}'s median-heuristic bandwidth divides by ln(ensemble_size), so it needs at least 2 members",
            f"set ensemble_size>=2, or a fixed {prefix}bandwidth",
        )
    check(
        m.repulsion_every >= 1, "repulsion_every", m.repulsion_every, "must be at least 1", "set {p}repulsion_every=1"
    )
    check(
        0 < m.repulsion_subset <= 1,
        "repulsion_subset",
        m.repulsion_subset,
        "must lie in (0, 1]",
        "set {p}repulsion_subset=1.0",
    )
    check(
        m.repulsion_ramp_start > 0,
        "repulsion_ramp_start",
        m.repulsion_ramp_start,
        "must be positive",
        "set {p}repulsion_ramp_start=1.0 (no ramp) or e.g. 100",
    )
    check(
        m.repulsion_ramp_epochs >= 0,
        "repulsion_ramp_epochs",
        m.repulsion_ramp_epochs,
        "must be non-negative",
        "set {p}repulsion_ramp_epochs=0 (no ramp) or e.g. 80",
    )
    check(
        not ramped(m) or m.name == "forde",
        "repulsion_ramp_epochs",
        m.repulsion_ramp_epochs,
        f"the repulsion ramp is a FoRDE option, but method.name = {m.name}",
        "set {p}repulsion_ramp_epochs=0",
    )
    check(m.lit_weight >= 0, "lit_weight", m.lit_weight, "must be non-negative", "set {p}lit_weight=1.0")
