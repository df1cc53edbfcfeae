"""The rules of a sweep's budget (forde.sweep.lifecycle) on made-up trials: what each attempt becomes, what
counts, what is retried, and what a worker may start next. No storage, no training."""

from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from forde.sweep.lifecycle import (
    DONE,
    DUPLICATE,
    ENVIRONMENT,
    GIVEN_UP,
    INTERRUPTED,
    KILLED,
    MAX_RETRIES,
    NOT_STARTED,
    STARTED,
    TRIAL,
    Ledger,
    decide,
)

SEEDS = {"seed": CategoricalDistribution([0, 1, 2, 3])}


def attempt(number, state=TrialState.COMPLETE, seed=0, failure=None, retry_of=None, started=True, queued_point=None):
    """A made-up attempt: `retry_of` makes it a retry of that configuration; a failed one carries `failure`."""
    user = {"failure": failure, "fail_reason": f"reason {number}"} if failure else {}
    if started and state != TrialState.WAITING:
        user[STARTED] = 1.0
    system = {"failed_trial": retry_of} if retry_of is not None else {}
    if queued_point is not None:
        system["fixed_params"] = queued_point
    t = create_trial(
        state=state,
        value=1.0 if state == TrialState.COMPLETE else None,
        params={} if queued_point is not None else {"seed": seed},
        distributions={} if queued_point is not None else SEEDS,
        user_attrs=user,
        system_attrs=system,
    )
    t.number = number
    return t


def nobody_gone(t):
    return None


def everybody_gone(t):
    return "its worker died"


def test_every_configuration_counts_once_however_many_attempts_it_takes():
    trials = [
        attempt(0, TrialState.FAIL, failure=ENVIRONMENT),
        attempt(1, TrialState.FAIL, failure=KILLED, retry_of=0),
        attempt(2, retry_of=0),
        attempt(3, TrialState.FAIL, seed=1, failure=TRIAL),
        attempt(4, TrialState.FAIL, seed=2, failure=DUPLICATE),
        attempt(5, TrialState.FAIL, seed=3, failure=NOT_STARTED),
    ]
    ledger = Ledger(trials)
    assert ledger.budget_used == 2 and sorted(ledger.configurations) == [0, 3]
    assert ledger.configurations[0].fates == [ENVIRONMENT, KILLED, DONE]


def test_a_failure_outside_the_configuration_is_retried_until_the_bound_then_given_up():
    trials = [attempt(0, TrialState.FAIL, failure=ENVIRONMENT)]
    for n in range(1, MAX_RETRIES):
        trials.append(attempt(n, TrialState.FAIL, failure=KILLED if n % 2 else ENVIRONMENT, retry_of=0))
    trials.append(attempt(MAX_RETRIES, TrialState.FAIL, failure=INTERRUPTED, retry_of=0))  # interruptions are free
    config = Ledger(trials).configurations[0]
    assert config.awaiting_retry and config.failure_kind(ENVIRONMENT) == GIVEN_UP
    assert config.failure_kind(INTERRUPTED) == INTERRUPTED and config.failure_kind(TRIAL) == TRIAL
    reason = config.given_up_reason("disk full")
    assert reason.startswith(
        f"given up after {MAX_RETRIES + 1} failures outside the configuration (the last: disk full"
    )
    assert all(f"attempt {n}: reason {n}" in reason for n in range(MAX_RETRIES))
    assert Ledger(trials[:-1]).configurations[0].failure_kind(INTERRUPTED) == INTERRUPTED

    d = decide(trials, n_trials=1, grid=[], samples=True, gone=nobody_gone)
    assert [t.number for t in d.requeue] == [MAX_RETRIES] and d.take == "queued"


def test_a_dead_workers_attempt_is_killed_and_retried_or_discarded_when_its_run_had_not_begun():
    trials = [
        attempt(0, TrialState.RUNNING),
        attempt(1, TrialState.RUNNING, seed=1, started=False),
        attempt(2, TrialState.FAIL, seed=2, failure=INTERRUPTED),
        attempt(3, TrialState.RUNNING, seed=2, retry_of=2, started=False),
    ]  # a retry that died before its run
    d = decide(trials, n_trials=3, grid=[], samples=True, gone=everybody_gone)
    assert [(f.attempt.number, f.kind) for f in d.fail] == [(0, KILLED), (1, NOT_STARTED), (3, NOT_STARTED)]
    assert "retried from its last checkpoint" in d.fail[0].reason and "discarded" in d.fail[1].reason
    # the killed one and the retry whose worker died at once are queued again; the discarded first attempt is
    # no configuration at all: its slot is free, and another is sampled later
    assert [t.number for t in d.requeue] == [0, 2]
    assert d.ledger.budget_used == 2 and sorted(d.ledger.configurations) == [0, 2]


def test_a_dead_workers_attempt_past_the_bound_is_given_up_and_counts():
    trials = [attempt(0, TrialState.FAIL, failure=KILLED)]
    trials += [attempt(n, TrialState.FAIL, failure=KILLED, retry_of=0) for n in range(1, MAX_RETRIES)]
    trials.append(attempt(MAX_RETRIES, TrialState.RUNNING, retry_of=0))
    d = decide(trials, n_trials=1, grid=[], samples=True, gone=everybody_gone)
    assert [f.kind for f in d.fail] == [GIVEN_UP] and "given up after" in d.fail[0].reason
    assert d.requeue == [] and d.take is None and d.ledger.budget_used == 1


def test_a_discarded_attempt_does_not_block_its_configuration():
    trials = [
        attempt(0, TrialState.FAIL, seed=1, failure=NOT_STARTED),
        attempt(1, TrialState.FAIL, seed=2, failure=DUPLICATE),
        attempt(2, seed=3),
    ]
    ledger = Ledger(trials)
    assert ledger.duplicate_of({"seed": 1}, 9) is None and ledger.duplicate_of({"seed": 2}, 9) is None
    assert ledger.duplicate_of({"seed": 3}, 9) == 2 and ledger.duplicate_of({"seed": 3}, 2) is None


def test_queued_attempts_go_first_and_nothing_new_starts_past_the_budget():
    queued_retry = [attempt(0, TrialState.FAIL, failure=INTERRUPTED), attempt(1, TrialState.WAITING, retry_of=0)]
    assert decide(queued_retry, n_trials=1, grid=[], samples=True, gone=nobody_gone).take == "queued"
    full = [attempt(0), attempt(1, TrialState.FAIL, seed=1, failure=TRIAL)]
    d = decide(full, n_trials=2, grid=[], samples=True, gone=nobody_gone)
    assert d.take is None and d.done == "the budget of 2 configurations is used"
    assert decide(full, n_trials=3, grid=[], samples=True, gone=nobody_gone).take == "sample"


def test_a_grid_is_queued_one_point_at_a_time_within_the_budget_and_a_grid_study_never_samples():
    grid = [{"seed": s} for s in range(4)]
    d = decide([], n_trials=4, grid=grid, samples=False, gone=nobody_gone)
    assert d.enqueue == {"seed": 0} and d.take == "queued"
    queued = [attempt(0, TrialState.WAITING, queued_point={"seed": 0})]
    assert decide(queued, n_trials=4, grid=grid, samples=False, gone=nobody_gone).enqueue is None  # one at a time
    two = [attempt(0), attempt(1, seed=1)]
    d = decide(two, n_trials=2, grid=grid, samples=False, gone=nobody_gone)  # --n-trials 2 on a 4-point grid
    assert d.take is None and d.enqueue is None
    four = [attempt(n, seed=n) for n in range(4)]
    d = decide(four, n_trials=10, grid=grid, samples=False, gone=nobody_gone)  # n_trials past the grid
    assert d.take is None and d.done == "every point of the grid (4) has been started"
    assert decide(four, n_trials=10, grid=grid, samples=True, gone=nobody_gone).take == "sample"  # grid, then TPE


def test_a_grid_point_whose_first_attempt_was_discarded_is_queued_again():
    trials = [attempt(0, TrialState.FAIL, seed=0, failure=NOT_STARTED)]
    d = decide(trials, n_trials=2, grid=[{"seed": 0}, {"seed": 1}], samples=False, gone=nobody_gone)
    assert d.enqueue == {"seed": 0}
