"""Sampling that never repeats a configuration across workers or re-launches, and stays reproducible.

A sampler built once per process with the study's seed draws the same sequence in every worker and every
re-launch: two workers' start-up trials came out identical. Here each trial is drawn by a sampler seeded
from the study's seed and the trial's number, which the storage hands out once per study: workers and
re-launches get different draws, and one worker with a seed draws the same sequence every time (trial n
depends on the seed, n and the trials before it). What the sampler still proposes twice (a small discrete
space, TPE converging) is caught by `duplicate_of` under the budget lock and drawn again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState


def trial_seed(study_seed: int, number: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{study_seed}:{number}".encode()).digest()[:4], "little")


class TrialSeededSampler(BaseSampler):
    """Delegates to a fresh sampler per trial, built by `make(seed)` with `trial_seed(seed, trial.number)`
    (or unseeded when the study gives no seed). Optuna's samplers keep no state between trials beyond their
    random generator and caches: everything they learn is read from the storage."""

    def __init__(self, make: Callable[[int | None], BaseSampler], seed: int | None):
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make(None if self._seed is None else trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def duplicate_of(params: dict[str, Any], lineage: int, trials: list[FrozenTrial], lineage_of) -> int | None:
    """The number of an earlier trial of another lineage with exactly these parameters, if any."""
    for t in trials:
        if lineage_of(t) != lineage and t.params == params and t.params:
            return t.number
    return None
