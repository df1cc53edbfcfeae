"""A study's trials as Optuna stores them: the one module that uses Optuna's storage interface and the system
attributes Optuna itself writes, so that a change in Optuna breaks here, where tests/test_records.py sees it.

Optuna's own keys, read and written as Optuna does:
    fixed_params    the parameters of a queued trial (`Study.enqueue_trial`)
    failed_trial    the first attempt's number, on a retry (`RetryFailedTrialCallback`)
    retry_history   the numbers of the attempts before a retry (`RetryFailedTrialCallback`)
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

FIXED_PARAMS, FAILED_TRIAL, RETRY_HISTORY = "fixed_params", "failed_trial", "retry_history"


def lineage(t: FrozenTrial) -> int:
    """The number of the configuration an attempt belongs to: its first attempt's."""
    return t.system_attrs.get(FAILED_TRIAL, t.number)


def params_of(t: FrozenTrial) -> dict[str, Any]:
    """The parameters an attempt runs with: sampled, or fixed when it was queued as a grid point."""
    return t.params or t.system_attrs.get(FIXED_PARAMS, {})


def is_retry(t: FrozenTrial) -> bool:
    return FAILED_TRIAL in t.system_attrs


def retry_of(failed: FrozenTrial, user_attrs: dict[str, Any]) -> FrozenTrial:
    """A queued (WAITING) attempt that retries `failed`: its parameters, reports and the given user attributes,
    marked as Optuna's RetryFailedTrialCallback marks a retry."""
    system: dict[str, Any] = {
        FAILED_TRIAL: lineage(failed),
        RETRY_HISTORY: [*failed.system_attrs.get(RETRY_HISTORY, []), failed.number],
    }
    if FIXED_PARAMS in failed.system_attrs:
        system[FIXED_PARAMS] = failed.system_attrs[FIXED_PARAMS]
    return optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=failed.params,
        distributions=failed.distributions,
        user_attrs=user_attrs,
        system_attrs=system,
        intermediate_values=failed.intermediate_values,
    )


class Records:
    """One study's trials in a storage, addressed by trial number; writes to a finished trial return False."""

    def __init__(self, storage: BaseStorage, study_name: str):
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study_name)
        self._ids: dict[int, int] = {}

    def trial_id(self, number: int) -> int:
        if number not in self._ids:
            self._ids[number] = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self._ids[number]

    def get(self, number: int) -> FrozenTrial:
        return self.storage.get_trial(self.trial_id(number))

    def set_user_attrs(self, number: int, attrs: dict[str, Any]) -> bool:
        try:
            for key, value in attrs.items():
                self.storage.set_trial_user_attr(self.trial_id(number), key, value)
        except UpdateFinishedTrialError:
            return False
        return True

    def set_system_attr(self, number: int, key: str, value: Any) -> bool:
        try:
            self.storage.set_trial_system_attr(self.trial_id(number), key, value)
        except UpdateFinishedTrialError:
            return False
        return True

    def fail(self, number: int, attrs: dict[str, Any]) -> bool:
        """Record `attrs`, then FAIL the attempt; False when it had finished meanwhile."""
        try:
            return self.set_user_attrs(number, attrs) and self.storage.set_trial_state_values(
                self.trial_id(number), TrialState.FAIL
            )
        except UpdateFinishedTrialError:
            return False
