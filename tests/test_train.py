"""The shared loop: determinism, resume, divergence, the schedule, and FoRDE's diversity over DE."""

import json

import pytest
import torch

from forde.config import OptimConfig, load_config
from forde.train import CHECKPOINT, METRICS, RESULTS, NonFiniteLossError, evaluate_run, lr_at, train

from conftest import CUDA, devices

TIMING_KEYS = {"train_time_s", "session_time_s", "run_dir"}


def tiny(tmp_path, *extra, name="run"):
    return load_config("quickstart", [f"run.out_dir={tmp_path}", f"run.name={name}", "run.progress=false",
                                      "ensemble_size=3", "model.hidden=[32]", "optim.epochs=3",
                                      f"data.root={tmp_path / 'data'}", "eval.corruptions=[none]", *extra])


def strip(results):
    return {k: v for k, v in results.items() if k not in TIMING_KEYS}


def final_weights(run_dir):
    return torch.load(run_dir / CHECKPOINT, weights_only=False)["ensemble"]


def test_run_directory_holds_config_metrics_checkpoint_results(tmp_path):
    results = train(tiny(tmp_path))
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", METRICS, CHECKPOINT, RESULTS}
    lines = [json.loads(l) for l in (run / METRICS).read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert {"train/loss", "train/ce", "train/repulsion", "train/lr", "test/accuracy", "test/nll"} <= set(lines[0])
    on_disk = json.loads((run / RESULTS).read_text())
    assert on_disk["summary"] == results["summary"]
    assert 0.5 < results["test"]["accuracy"] <= 1.0
    assert len(results["test"]["member_accuracy"]) == 3


def test_same_seed_same_results_on_cpu(tmp_path):
    a = train(tiny(tmp_path, name="a"))
    b = train(tiny(tmp_path, name="b"))
    assert strip(a) == strip(b)
    for k, v in final_weights(tmp_path / "a").items():
        assert torch.equal(v, final_weights(tmp_path / "b")[k]), k
    c = train(tiny(tmp_path, "seed=1", name="c"))
    assert c["summary"] != a["summary"]


class Crash:
    def __init__(self, at):
        self.at = at

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.at:
            raise KeyboardInterrupt("simulated kill")

    def on_train_end(self, results):
        pass


@pytest.mark.parametrize("device", devices())
def test_resume_continues_the_same_run(tmp_path, device):
    """Killed after epoch 2 and started again, a run ends exactly where the uninterrupted run ends: weights,
    optimizer, data order and RNG states all come back (on CUDA the generator's state stays a CPU tensor)."""
    opts = ["optim.epochs=4", f"device={device}"]
    straight = train(tiny(tmp_path, *opts, name="straight"))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, *opts, name="resumed"), callbacks=[Crash(at=2)])
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["epoch"] == 2
    assert not (tmp_path / "resumed" / RESULTS).exists()
    resumed = train(tiny(tmp_path, *opts, name="resumed"))
    assert strip(resumed) == strip(straight)
    lines = (tmp_path / "resumed" / METRICS).read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3, 4]
    for k, v in final_weights(tmp_path / "straight").items():
        assert torch.equal(v, final_weights(tmp_path / "resumed")[k]), k


@CUDA
def test_a_cuda_run_is_evaluated_on_the_cpu_from_its_checkpoint(tmp_path):
    on_gpu = train(tiny(tmp_path, "device=cuda", "precision=bf16", "channels_last=true"))
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)["ensemble"]["members.0.net.1.weight"].is_cuda
    on_cpu = evaluate_run(tmp_path / "run", ["device=cpu", "precision=fp32"], out_name="cpu.json")
    assert on_cpu["test"]["accuracy"] == pytest.approx(on_gpu["test"]["accuracy"], abs=0.02)


@CUDA
@pytest.mark.parametrize("method", ["forde", "de"])
def test_cuda_graphs_train_as_the_eager_steps_do(tmp_path, method):
    """Steps replayed from CUDA graphs (two kinds of step with repulsion_every=2) against eager steps."""
    opts = ["device=cuda", f"method.name={method}", "method.repulsion_every=2", "optim.epochs=3"]
    eager = train(tiny(tmp_path, *opts, name="eager"))
    graphed = train(tiny(tmp_path, *opts, "cuda.graphs=true", name="graphed"))
    assert graphed["test"]["nll"] == pytest.approx(eager["test"]["nll"], rel=1e-4)
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "graphed")
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(NonFiniteLossError, match="Lower optim.lr"):
        train(tiny(tmp_path, "optim.lr=1e12", "method.name=de"))


def test_forde_gradients_are_more_diverse_than_de(tmp_path):
    common = ["optim.epochs=5", "ensemble_size=4", "eval.grad_samples=359"]
    de = train(tiny(tmp_path, *common, "method.name=de", name="de"))
    fo = train(tiny(tmp_path, *common, "method.name=forde", "method.alpha=0.0", name="fo"))
    assert fo["test"]["grad_cosine_distance"] > de["test"]["grad_cosine_distance"] + 0.01


def test_eval_re_evaluates_the_checkpoint(tmp_path):
    first = train(tiny(tmp_path))
    again = evaluate_run(tmp_path / "run", [], out_name="eval.json")
    assert again["test"] == first["test"]
    assert (tmp_path / "run" / "eval.json").exists()


def test_existing_run_dir_with_other_config_is_refused(tmp_path):
    train(tiny(tmp_path, "optim.epochs=1"))
    from forde.config import ConfigError
    with pytest.raises(ConfigError, match="different config.*method"):
        train(tiny(tmp_path, "optim.epochs=1", "method.alpha=0.5"))


def test_schedule_is_constant_then_linear_then_constant():
    cfg = OptimConfig(lr=0.1, epochs=100, lr_ratio=0.01)
    assert lr_at(0, cfg) == lr_at(50, cfg) == 0.1
    assert lr_at(70, cfg) == pytest.approx(0.1 * (1 - 0.5 * 0.99))
    assert lr_at(90, cfg) == lr_at(99.9, cfg) == pytest.approx(0.001)
    warm = OptimConfig(lr=0.1, epochs=100, warmup_epochs=5)
    assert lr_at(0, warm) == 0.0 and lr_at(2.5, warm) == pytest.approx(0.05) and lr_at(5, warm) == 0.1
