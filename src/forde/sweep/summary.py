"""What a study has come to, in words and a table: the launcher's last lines, and best.md."""

from __future__ import annotations

from collections import Counter

import optuna
from optuna.trial import FrozenTrial, TrialState

from forde.sweep.lifecycle import FAILURE, REASON, Ledger
from forde.sweep.study import Study


def best_table(opt: optuna.Study, study: Study) -> str:
    """Markdown table of the best trial (single objective) or the Pareto front (several)."""
    done = opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return "no completed trials yet\n"
    best = opt.best_trials if study.multi_objective else [opt.best_trial]
    keys = sorted({k for t in best for k in t.params})
    metrics = [o.metric for o in study.objectives]
    head = ["trial", *metrics, *keys, "run_dir"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted(best, key=lambda t: t.number):
        vals = [f"{v:.4f}" for v in t.values]
        params = [_fmt(t.params.get(k, "")) for k in keys]
        lines.append("| " + " | ".join([str(t.number), *vals, *params, t.user_attrs.get("run_dir", "")]) + " |")
    title = "Pareto front" if study.multi_objective else "Best trial"
    return (
        f"{title} of study '{study.name}' ({', '.join(f'{o.metric} {o.direction}' for o in study.objectives)})\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def state_counts(trials: list[FrozenTrial]) -> str:
    """'3 complete, 1 pruned, 1 failed (killed), 1 waiting': trial states, failures by their kind."""
    counts = Counter(
        f"failed ({t.user_attrs.get(FAILURE, 'trial')})" if t.state == TrialState.FAIL else t.state.name.lower()
        for t in trials
    )
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no trials"


def status(trials: list[FrozenTrial], study: Study) -> str:
    """The study's state in a few lines: trials, the budget, and each configuration given up with its reasons."""
    ledger = Ledger(trials)
    lines = [
        f"study '{study.name}': {state_counts(trials)}; budget {ledger.budget_used} of {study.size} configurations used"
    ]
    for config in ledger.given_up():
        lines.append(f"  configuration of trial {config.number} given up: {config.last.user_attrs.get(REASON, '?')}")
    return "\n".join(lines)
