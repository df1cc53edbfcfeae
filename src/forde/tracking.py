"""Weights & Biases, one run per trial: online when logged in and reachable, offline otherwise.

The run directory stays the record; W&B mirrors it, and never costs a run: an online run that does not
start within `run.wandb.init_timeout` seconds logs offline instead, and any later W&B error stops the
mirroring with a warning while training goes on. A resumed run continues its W&B run: online, the same
run id from the last step the server has; offline, a new offline copy replayed from the checkpoint's
history (the partial copy of the killed session moves to `wandb/replaced/`). Offline runs live in
`<run_dir>/wandb/`, are read back with `wandb leet inspect --summary --json <run_dir>/wandb/offline-run-*`,
browsed with `wandb leet <run_dir>/wandb`, and uploaded later with `wandb sync`.
"""

from __future__ import annotations

import logging
import netrc
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlparse

from forde.config import TrainConfig, WandbConfig, to_dict
from forde.errors import one_line
from forde.provenance import code_version

log = logging.getLogger(__name__)

WANDB_URL = "https://api.wandb.ai"


def _server() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL") or WANDB_URL)
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_server()[0]) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(_server(), timeout=timeout):
            return True
    except OSError:
        return False


WandbMode = Literal["online", "offline", "disabled"]


def resolve_mode(cfg: WandbConfig) -> WandbMode:
    """auto -> $WANDB_MODE if set, else online only with an API key and a reachable server; never blocks a
    run on W&B. An explicit mode in the config (or --no-wandb) wins over the environment."""
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return cast(WandbMode, os.environ["WANDB_MODE"])
    return "online" if _has_api_key() and _reachable() else "offline"


def per_set_table(per_set: list[dict]):
    import wandb

    cols: list[str | int] = [
        "corruption",
        "severity",
        "source",
        "accuracy",
        "nll",
        "ece",
        "epistemic",
        "grad_cosine_distance",
    ]
    return wandb.Table(columns=cols, data=[[row.get(c) for c in cols] for row in per_set])


def per_severity_table(summary: dict):
    import wandb

    cols: list[str | int] = ["severity", "accuracy", "nll", "ece", "ece_set_mean", "epistemic", "grad_cosine_distance"]
    rows = [
        [group.removeprefix("severity_")] + [vals.get(c) for c in cols[1:]]
        for group, vals in summary.items()
        if group.startswith("severity_")
    ]
    return wandb.Table(columns=cols, data=rows)


def curve_plots(curves: dict) -> dict:
    """The test set's reliability diagram and risk-coverage curve (and after temperature scaling) as W&B line plots."""
    import wandb

    plots = {}
    for name, curve in curves.items():
        if name.endswith("reliability"):
            rows = [[c, a] for c, a in zip(curve["confidence"], curve["accuracy"]) if c is not None]
            table = wandb.Table(columns=["confidence", "accuracy"], data=rows)
            plots[f"test/{name}"] = wandb.plot.line(table, "confidence", "accuracy", title=f"test {name}")
        else:
            table = wandb.Table(
                columns=["coverage", "risk"], data=list(map(list, zip(curve["coverage"], curve["risk"])))
            )
            plots[f"test/{name}"] = wandb.plot.line(table, "coverage", "risk", title=f"test {name}")
    return plots


def ood_table(ood: dict):
    """One row per OOD set and score: AUROC, AUPR-In, AUPR-Out, FPR95."""
    import wandb

    from forde.ood import DETECTION, SCORES

    cols: list[str | int] = ["set", "score", *DETECTION]
    rows = [
        [name, score, *(vals.get(f"{m}_{score}") for m in DETECTION)] for name, vals in ood.items() for score in SCORES
    ]
    return wandb.Table(columns=cols, data=rows)


class WandbRun:
    """Training callback mirroring a run directory into one W&B run (the same run id across retries).

    `finish(outcome)` marks how the run ended: finished, pruned, failed or interrupted (summary key
    `outcome`, and a tag for every outcome but finished)."""

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, run_id: str, name: str, extra_config: dict[str, Any] | None = None
    ):
        import wandb

        self.mode = resolve_mode(cfg.run.wandb)
        self.run = None
        self.run_dir, self.run_id = Path(run_dir), run_id
        if self.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        w = cfg.run.wandb
        kwargs: dict[str, Any] = dict(
            project=w.project,
            entity=w.entity,
            group=w.group,
            tags=list(w.tags),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            config={**to_dict(cfg), **(extra_config or {}), "run_dir": str(self.run_dir), "code": code_version()},
        )
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.mode == "offline":
                self._set_aside_partial_copies()
            self.run = wandb.init(mode=self.mode, settings=wandb.Settings(init_timeout=w.init_timeout), **kwargs)
        except Exception as err:
            if self.mode != "online":
                self._lost(err)
                return
            log.warning(
                "W&B online run %s did not start within %gs (%s); logging offline instead",
                name,
                w.init_timeout,
                one_line(err),
            )
            wandb.teardown()  # the failed online run still holds its id in this process's W&B service
            self.mode = "offline"
            try:
                self._set_aside_partial_copies()
                self.run = wandb.init(mode="offline", **kwargs)
            except Exception as err2:
                self._lost(err2)
                return
        log.info("W&B %s run %s (%s)", self.mode, name, self.run.dir)

    def _set_aside_partial_copies(self) -> None:
        """Offline copies of earlier sessions of this run: the new copy replays their epochs from the
        checkpoint's history, so they move out of the way of `wandb sync`."""
        wandb_dir = self.run_dir / "wandb"
        for old in sorted(wandb_dir.glob(f"offline-run-*-{self.run_id}")):
            (wandb_dir / "replaced").mkdir(exist_ok=True)
            shutil.move(str(old), wandb_dir / "replaced" / old.name)
            log.info(
                "W&B: %s is superseded by this session's offline copy; moved to %s", old.name, wandb_dir / "replaced"
            )

    def _lost(self, err: Exception) -> None:
        log.warning(
            "W&B %s logging of %s stopped (%s); the run goes on and its run directory keeps every metric",
            self.mode,
            self.run_dir,
            one_line(err),
        )
        self.run = None

    def _log(self, metrics: dict, step: int) -> None:
        assert self.run is not None  # callers return early without a run
        self.run.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=step)

    def on_history(self, history: list[dict]) -> None:
        """Epochs of earlier sessions that the W&B run lacks (all of them for a new offline copy)."""
        if self.run is None:
            return
        try:
            start = self.run.starting_step
            for metrics in history:
                if metrics["epoch"] >= start:
                    self._log(metrics, metrics["epoch"])
        except Exception as err:
            self._lost(err)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        if self.run is None:
            return
        try:
            self._log(metrics, epoch)
        except Exception as err:
            self._lost(err)

    def on_train_end(self, results: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({**results["summary"], "run_dir": results["run_dir"]})
            if "provenance" in results:  # code version, dataset fingerprints, each corrupted set's source
                self.run.config.update({"provenance": results["provenance"]}, allow_val_change=True)
            corrupted = results.get("corrupted")
            if corrupted:
                self.run.log(
                    {
                        "corrupted/per_set": per_set_table(corrupted["per_set"]),
                        "corrupted/per_severity": per_severity_table(corrupted["summary"]),
                    }
                )
            if results.get("ood"):
                self.run.log({"ood/table": ood_table(results["ood"])})
            if results.get("curves", {}).get("test"):
                self.run.log(curve_plots(results["curves"]["test"]))
        except Exception as err:
            self._lost(err)

    def finish(self, outcome: str = "finished", reason: str | None = None) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.summary["outcome"] = outcome
            if reason:
                run.summary["fail_reason"] = reason
            if outcome != "finished":
                run.tags = (*(run.tags or ()), outcome)
            run.finish(exit_code=0 if outcome in ("finished", "pruned") else 1)
        except Exception as err:
            log.warning("W&B run of %s did not finish cleanly (%s)", self.run_dir, one_line(err))
        if self.mode == "offline":
            log.info("W&B offline run saved; upload with: wandb sync %s", Path(run.dir).parent)
