"""The private interfaces of PyTorch and Python that forde uses (forde.torch_internals): each test fails loudly when a
release changes one, so that its fallback is never taken in silence."""

import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.process import BaseProcess

import pytest
import torch
import torch.nn.functional as F

from forde.models.batchnorm import batch_norm
from forde.torch_internals import is_compiled, pool_processes, unsafe_globals, weight_grad_used


class Probe(torch.autograd.Function):
    """y = x * w; its backward records whether the engine will use w's gradient."""

    seen: list[bool] = []

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w.view(-1)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        Probe.seen.append(weight_grad_used(fallback=None))  # None: the private interface did not answer
        return gy * w.view(-1), (gy * x).sum(0).view_as(w)


def test_the_autograd_engine_says_which_gradients_a_backward_pass_uses():
    assert hasattr(torch._C, "_current_autograd_node") and hasattr(torch._C, "_will_engine_execute_node")
    x = torch.randn(3, 2, requires_grad=True)
    w = torch.randn(2, requires_grad=True)
    Probe.seen.clear()
    torch.autograd.grad(Probe.apply(x, w.view(2)).sum(), x)  # the input's gradient only
    torch.autograd.grad(Probe.apply(x, w.view(2)).sum(), w)  # the weight's
    assert Probe.seen == [False, True]
    assert weight_grad_used(fallback=True) is True  # outside a backward pass: the fallback


def test_a_refused_checkpoint_names_what_it_holds_in_both_formats(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    for zipped in (True, False):
        path = tmp_path / f"evil-{zipped}.pt"
        torch.save({"a": Evil()}, path, _use_new_zipfile_serialization=zipped)
        with pytest.raises(pickle.UnpicklingError) as refusal:
            torch.load(path, weights_only=True)
        assert unsafe_globals(path, refusal.value) == ["posix.system"], zipped
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02garbage")
    with pytest.raises(pickle.UnpicklingError) as err:
        torch.load(damaged, weights_only=True)
    assert unsafe_globals(damaged, err.value) is None


def test_a_pool_s_worker_processes_are_found():
    with ProcessPoolExecutor(max_workers=2) as pool:
        assert pool.submit(abs, -1).result() == 1
        workers = pool_processes(pool)
        assert workers and all(isinstance(p, BaseProcess) and p.is_alive() for p in workers)


def test_batch_norm_refuses_one_value_per_channel_as_torch_does():
    x, w, b = torch.randn(1, 3), torch.ones(3), torch.zeros(3)
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(x, None, None, w, b, training=True)
    with pytest.raises(ValueError) as ours:
        batch_norm(x, None, None, w, b, training=True)
    assert str(ours.value) == str(theirs.value)


def test_compiled_modules_are_recognised_both_ways():
    wrapped = torch.compile(torch.nn.Linear(3, 2))
    in_place = torch.nn.Linear(3, 2)
    in_place.compile()
    assert is_compiled(wrapped) and is_compiled(in_place) and not is_compiled(torch.nn.Linear(3, 2))


def test_a_compiled_member_under_forde_is_one_line_before_its_step():
    from forde.config import ConfigError, MethodConfig
    from forde.ensemble import Ensemble
    from forde.methods.forde import FoRDE

    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)) for _ in range(2)]
    members[1] = torch.compile(members[1])
    x, y = torch.randn(5, 1, 2, 2), torch.randint(0, 3, (5,))
    with pytest.raises(ConfigError, match=r"ensemble member 1 is compiled with torch.compile, which cannot be diff"):
        FoRDE(MethodConfig(alpha=0.0), None).loss(Ensemble(members), x, y)
