"""The checks of a config that types alone cannot express, section by section: ranges, and keys that must agree.
Each failure is one ConfigError naming the key, its value, the rule and a fix."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any, get_args

from forde.config.schema import (
    BLOCK_MODELS,
    CORRUPTION_SELECTIONS,
    KERNEL_METHODS,
    RESNET18_BLOCKS,
    GradTarget,
    MedianMode,
    MethodConfig,
    TrainConfig,
)
from forde.errors import ConfigError
from forde.trust import model_source


def _check(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {rule}; {fix}")


def validate(cfg: TrainConfig) -> None:
    """Range and consistency checks that types alone cannot express."""
    _check_finite(cfg)
    _validate_names(cfg)
    validate_method(cfg.method, cfg.ensemble_size)
    _validate_optim(cfg)
    _validate_model(cfg)
    _validate_data_and_eval(cfg)
    _validate_device(cfg)
    _validate_distributed(cfg)


def _check_finite(node: Any, prefix: str = "") -> None:
    """No setting is infinite or NaN (`optim.lr=inf` would train to a NaN loss; YAML reads .inf and 1e309 as inf)."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            default = getattr(type(node)(), f.name)
            _check(False, prefix + f.name, value, "must be a finite number", f"set {prefix}{f.name}={default}")


def _validate_names(cfg: TrainConfig) -> None:
    from forde.names import RULE, is_path_component

    d = cfg.data
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


def _validate_optim(cfg: TrainConfig) -> None:
    o = cfg.optim
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


def _validate_model(cfg: TrainConfig) -> None:
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
    _check(
        mc.execution != "vmap" or cfg.method.name not in MEMBERWISE_METHODS,
        "model.execution",
        mc.execution,
        f"method.name = {cfg.method.name} runs the members one after another (it reads or changes each one's layers)",
        "set model.execution=loop (or auto)",
    )


MEMBERWISE_METHODS = ("rde_feature", "node_bnn")


def _validate_data_and_eval(cfg: TrainConfig) -> None:
    from forde.data.corruption_names import CORRUPTIONS  # names only: cheap, no image libraries

    d, e = cfg.data, cfg.eval
    _check(
        0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must lie in [0, 1)", "set data.val_fraction=0.1"
    )
    _check(
        d.max_image_pixels >= 1,
        "data.max_image_pixels",
        d.max_image_pixels,
        "must be at least 1",
        "set data.max_image_pixels=16777216 (4096 x 4096)",
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
        not (e.calibrate_members and e.calibrate is False),
        "eval.calibrate_members",
        e.calibrate_members,
        "asks for one temperature per member, but eval.calibrate = false turns temperature scaling off",
        "set eval.calibrate=null (or true), or eval.calibrate_members=false",
    )
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
    from forde.data.ood_names import OOD_SETS  # names only

    unknown_ood = [n for n in e.ood if n not in OOD_SETS]
    _check(
        not unknown_ood,
        "eval.ood",
        e.ood,
        f"unknown set(s) {unknown_ood}",
        f"use [] or names from {', '.join(OOD_SETS)}",
    )
    unknown = [c for c in e.corruptions if c not in CORRUPTIONS and c not in CORRUPTION_SELECTIONS]
    _check(
        not unknown,
        "eval.corruptions",
        e.corruptions,
        f"unknown corruption(s) {unknown}",
        f"use all, benchmark, none or names from {', '.join(CORRUPTIONS)}",
    )


def _validate_device(cfg: TrainConfig) -> None:
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
        not (cfg.cuda.graphs and ramped(cfg.method)),
        "cuda.graphs",
        cfg.cuda.graphs,
        "a replayed step repeats its captured repulsion weight, so it cannot follow method.repulsion_ramp_epochs",
        "set cuda.graphs=false, or method.repulsion_ramp_epochs=0",
    )


def _validate_distributed(cfg: TrainConfig) -> None:
    _check(
        cfg.run.distributed in ("data", "members"),
        "run.distributed",
        cfg.run.distributed,
        "must be data (each process a share of every batch) or members (each process a share of the members)",
        "set run.distributed=data",
    )
    _check(
        cfg.run.collective_timeout_s > 0,
        "run.collective_timeout_s",
        cfg.run.collective_timeout_s,
        "must be positive",
        "set run.collective_timeout_s=1800",
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
    check(
        m.feature_prior_scale >= 0,
        "feature_prior_scale",
        m.feature_prior_scale,
        "must be non-negative (0 = no feature prior)",
        "set {p}feature_prior_scale=0.001",
    )
    check(
        m.feature_projection_dim >= 1,
        "feature_projection_dim",
        m.feature_projection_dim,
        "must be at least 1",
        "set {p}feature_projection_dim=5",
    )
    check(
        0 <= m.swag_start < 1,
        "swag_start",
        m.swag_start,
        "must lie in [0, 1): moments are collected after this share of the epochs, so at least the last one",
        "set {p}swag_start=0.537 (after 161 of 300 epochs, the reference)",
    )
    check(
        m.swag_rank == 0 or m.swag_rank >= 2,
        "swag_rank",
        m.swag_rank,
        "must be 0 (diagonal covariance) or at least 2 (the low-rank part divides by rank - 1)",
        "set {p}swag_rank=20",
    )
    check(m.swag_samples >= 1, "swag_samples", m.swag_samples, "must be at least 1", "set {p}swag_samples=30")
    check(m.swag_scale >= 0, "swag_scale", m.swag_scale, "must be non-negative", "set {p}swag_scale=0.5")
    for key, value in (
        ("node_components", m.node_components),
        ("node_train_samples", m.node_train_samples),
        ("node_test_samples", m.node_test_samples),
    ):
        check(value >= 1, key, value, "must be at least 1", f"set {{p}}{key}={getattr(MethodConfig, key)}")
    for key, std in (("node_prior_std", m.node_prior_std), ("node_init_std", m.node_init_std)):
        check(std > 0, key, std, "must be positive", f"set {{p}}{key}=0.4")
    check(m.node_gamma >= 0, "node_gamma", m.node_gamma, "must be non-negative", "set {p}node_gamma=1.0")
    check(0 <= m.node_kl_ramp <= 1, "node_kl_ramp", m.node_kl_ramp, "must lie in [0, 1]", "set {p}node_kl_ramp=0.667")
    check(m.node_lr > 0, "node_lr", m.node_lr, "must be positive", "set {p}node_lr=0.1")
