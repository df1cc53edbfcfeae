"""forde.sweep.records is the one place that uses Optuna's storage interface and the system attributes Optuna writes:
these tests fail if Optuna changes what they rely on."""

import warnings

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from forde.sweep.records import FIXED_PARAMS, Records, is_retry, lineage, params_of, retry_of


def study_with_a_failed_trial():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="s")
    trial = study.ask({"x": FloatDistribution(0, 1)})
    study.tell(trial, state=TrialState.FAIL)
    return study, study.trials[0]


def test_a_retry_is_marked_as_optuna_s_retry_callback_marks_it():
    study, failed = study_with_a_failed_trial()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the callback is experimental
        RetryFailedTrialCallback()(study, failed)
        retried_number = RetryFailedTrialCallback.retried_trial_number(study.trials[-1])
    theirs = study.trials[-1]
    ours = retry_of(failed, {"config_params": {"x": 1}})
    assert theirs.state == ours.state == TrialState.WAITING
    assert ours.system_attrs == theirs.system_attrs  # the same keys and values: failed_trial, retry_history
    assert lineage(theirs) == retried_number == failed.number
    assert is_retry(theirs) and not is_retry(failed)
    assert ours.params == failed.params and ours.user_attrs == {"config_params": {"x": 1}}


def test_a_queued_trial_s_parameters_are_where_optuna_keeps_them():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({"x": 0.25})
    [queued] = study.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs[FIXED_PARAMS] == {"x": 0.25} and params_of(queued) == {"x": 0.25}


def test_records_write_a_running_trial_and_refuse_a_finished_one():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s")
    running = study.ask()
    records = Records(storage, "s")
    assert records.set_user_attrs(running.number, {"worker": "h:1"})
    assert records.set_system_attr(running.number, "forde:heartbeat", 1.5)
    assert records.fail(running.number, {"failure": "killed"})
    done = records.get(running.number)
    assert done.state == TrialState.FAIL and done.user_attrs == {"worker": "h:1", "failure": "killed"}
    assert done.system_attrs["forde:heartbeat"] == 1.5
    assert not records.set_user_attrs(running.number, {"late": 1})  # finished: refused, not raised
    assert not records.set_system_attr(running.number, "forde:heartbeat", 2.0)
    assert not records.fail(running.number, {"failure": "killed"})
