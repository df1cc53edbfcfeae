"""Weights & Biases, one run per trial: online when logged in and reachable, offline otherwise.

The run directory stays the record; W&B mirrors it. Offline runs live in `<run_dir>/wandb/` and are
read back with `wandb leet inspect --summary --json <run_dir>/wandb/offline-run-*`, browsed with
`wandb leet <run_dir>/wandb`, and uploaded later with `wandb sync`.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any

from forde.config import TrainConfig, WandbConfig, to_dict
from forde.provenance import code_version

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str = WANDB_HOST, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(cfg: WandbConfig) -> str:
    """auto -> $WANDB_MODE if set, else online only with an API key and a reachable server; never blocks a
    run on W&B. An explicit mode in the config (or --no-wandb) wins over the environment."""
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    return "online" if _has_api_key() and _reachable() else "offline"


def per_set_table(per_set: list[dict]):
    import wandb

    cols = ["corruption", "severity", "source", "accuracy", "nll", "ece", "epistemic", "grad_cosine_distance"]
    return wandb.Table(columns=cols, data=[[row.get(c) for c in cols] for row in per_set])


def per_severity_table(summary: dict):
    import wandb

    cols = ["severity", "accuracy", "nll", "ece", "ece_set_mean", "epistemic", "grad_cosine_distance"]
    rows = [[group.removeprefix("severity_")] + [vals.get(c) for c in cols[1:]]
            for group, vals in summary.items() if group.startswith("severity_")]
    return wandb.Table(columns=cols, data=rows)


class WandbRun:
    """Training callback mirroring a run directory into one W&B run (resumed by id after a retry)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, run_id: str, name: str, extra_config: dict[str, Any] | None = None):
        import wandb

        self.mode = resolve_mode(cfg.run.wandb)
        self.run = None
        if self.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        w = cfg.run.wandb
        self.run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags), name=name,
                              id=run_id, resume="allow", dir=str(run_dir), mode=self.mode,
                              config={**to_dict(cfg), **(extra_config or {}), "run_dir": str(run_dir),
                                      "code": code_version()})
        log.info("W&B %s run %s (%s)", self.mode, name, self.run.dir)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=epoch)

    def on_train_end(self, results: dict) -> None:
        if self.run is None:
            return
        self.run.summary.update({**results["summary"], "run_dir": results["run_dir"]})
        if "provenance" in results:  # code version, dataset fingerprints, each corrupted set's source
            self.run.config.update({"provenance": results["provenance"]}, allow_val_change=True)
        corrupted = results.get("corrupted")
        if corrupted:
            self.run.log({"corrupted/per_set": per_set_table(corrupted["per_set"]),
                          "corrupted/per_severity": per_severity_table(corrupted["summary"])})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            if self.mode == "offline":
                log.info("W&B offline run saved; upload with: wandb sync %s", Path(self.run.dir).parent)
            self.run = None
