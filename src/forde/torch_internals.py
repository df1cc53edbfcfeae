"""The interfaces of PyTorch and Python that are not public but that forde uses, each behind one function here, with
a fallback that keeps results right where a release lacks it; tests/test_internals.py fails loudly when a release
changes one of them, so that the fallback is never taken silently."""

from __future__ import annotations

import pickle
import re
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch

WEIGHTS_ONLY_REFUSAL = "Weights only load failed"  # how torch.load(weights_only=True) begins its refusal


def weight_grad_used(fallback: bool) -> bool:
    """Inside an autograd Function's backward: whether the engine will use the gradient of the Function's second
    input (input 1) in this pass, read from the current autograd node (torch._C, private). `fallback` (its
    ctx.needs_input_grad[1]) where the node cannot say: outside a backward pass, or a PyTorch without them."""
    try:
        node = torch._C._current_autograd_node()
        nxt = None if node is None else node.next_functions[1][0]
        if nxt is None:  # outside a backward pass, or no gradient path to that input
            return fallback
        return bool(torch._C._will_engine_execute_node(nxt))
    except (AttributeError, RuntimeError):
        return fallback


def unsafe_globals(path: str | Path, err: pickle.UnpicklingError) -> list[str] | None:
    """What a weights-only torch.load refused in `path`: the globals it names (torch.serialization's public
    listing, for the zip format of every torch.save since 1.6), or None when `err` is no such refusal (a damaged
    file). For the legacy format, which that listing does not read, torch's message names it (its text, private:
    `GLOBAL module.name` after WEIGHTS_ONLY_REFUSAL)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) or None
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
        pass
    text = str(err)
    named = re.search(r"GLOBAL (\S+)", text) if text.startswith(WEIGHTS_ONLY_REFUSAL) else None
    return [named.group(1)] if named else None  # torch says "Weights only load failed" of damaged files too


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether torch.compile wrapped `module` (torch.compile(m) returns an OptimizedModule of torch._dynamo, a
    private class) or compiled it in place (m.compile() sets its private _compiled_call_impl)."""
    kind = type(module)
    wrapped = kind.__name__ == "OptimizedModule" and kind.__module__.startswith("torch._dynamo")
    return wrapped or getattr(module, "_compiled_call_impl", None) is not None


def pool_processes(pool: ProcessPoolExecutor) -> list[BaseProcess]:
    """The worker processes of a pool (its private `_processes`; Python 3.14 adds `terminate_workers`)."""
    return list((getattr(pool, "_processes", None) or {}).values())
