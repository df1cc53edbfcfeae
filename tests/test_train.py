"""The shared loop: determinism, resume, divergence, the schedule, and FoRDE's diversity over DE."""

import json

import pytest
import torch

from conftest import CUDA, devices
from forde.config import ConfigError, OptimConfig, load_config
from forde.errors import NonFiniteLossError, RunDirError
from forde.run_dir import CHECKPOINT, METRICS, PREVIOUS_CHECKPOINT, RESULTS
from forde.run_evaluation import evaluate_run
from forde.train import lr_at, train

TIMING_KEYS = {"train_time_s", "session_time_s", "eval_time_s", "run_dir"}


def tiny(tmp_path, *extra, name="run"):
    return load_config(
        "quickstart",
        [
            f"run.out_dir={tmp_path}",
            f"run.name={name}",
            "run.progress=false",
            "ensemble_size=3",
            "model.hidden=[32]",
            "optim.epochs=3",
            f"data.root={tmp_path / 'data'}",
            "eval.corruptions=[none]",
            *extra,
        ],
    )


def strip(results):
    return {k: v for k, v in results.items() if k not in TIMING_KEYS}


def final_weights(run_dir):
    return torch.load(run_dir / CHECKPOINT, weights_only=False)["ensemble"]


def test_run_directory_holds_config_metrics_checkpoint_results(tmp_path):
    results = train(tiny(tmp_path))
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", METRICS, CHECKPOINT, RESULTS}
    lines = [json.loads(ln) for ln in (run / METRICS).read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2, 3]
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
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3, 4]
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


def test_a_diverged_run_restarts_with_a_new_learning_rate(tmp_path):
    with pytest.raises(
        NonFiniteLossError, match=r"the run diverged at optim.lr=1e\+12 \(.*\); lower optim.lr and run again"
    ):
        train(tiny(tmp_path, "optim.lr=1e12", "method.name=de", name="diverged"))
    # a run stopped after two epochs (diverged, or killed), then asked to go on with another learning rate
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, "optim.lr=0.2"), callbacks=[Crash(at=2)])
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.2 -> 0.05\).*run.restart=true") as err:
        train(tiny(tmp_path, "optim.lr=0.05"))
    assert "remove" not in str(err.value) and "delete" not in str(err.value)
    results = train(tiny(tmp_path, "optim.lr=0.05", "run.restart=true"))
    assert results["epochs"] == 3 and json.loads((tmp_path / "run" / METRICS).read_text().splitlines()[0])["epoch"] == 1
    kept = tmp_path / "run" / "previous-1"
    assert load_config(kept / "config.yaml").optim.lr == 0.2  # the stopped attempt, kept
    assert torch.load(kept / CHECKPOINT, weights_only=False)["epoch"] == 2
    assert train(tiny(tmp_path, "optim.lr=0.05", "run.restart=true")) == results  # the same command again: done


def test_a_run_that_diverges_after_an_epoch_names_the_checkpoint_it_kept(tmp_path):
    cfg = tiny(tmp_path, "method.name=de")

    class RaiseTheLearningRate:  # after the first epoch: the Trainer reads optim.lr from this config every step
        def on_epoch_end(self, epoch, metrics):
            cfg.optim.lr = 1e12

        def on_train_end(self, results):
            pass

    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, callbacks=[RaiseTheLearningRate()])
    kept = f"({tmp_path / 'run' / CHECKPOINT} holds epoch 1, the last good one); lower optim.lr and run again with "
    assert "in epoch 2" in str(err.value) and kept + "run.restart=true" in str(err.value), err.value


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
    with pytest.raises(ConfigError, match=r"different config \(method.alpha: 1.0 -> 0.5\)"):
        train(tiny(tmp_path, "optim.epochs=1", "method.alpha=0.5"))


def test_moved_data_and_another_device_resume_the_same_run(tmp_path):
    first = train(tiny(tmp_path, "optim.epochs=2"))
    (tmp_path / "data").rename(tmp_path / "moved")
    again = train(tiny(tmp_path, "optim.epochs=2", f"data.root={tmp_path / 'moved'}", "device=cpu"))
    assert again == first


def test_a_run_that_fails_before_training_leaves_nothing_in_the_way(tmp_path):
    with pytest.raises(ConfigError, match="cifar10"):
        train(tiny(tmp_path, "data.name=cifar10", "model.name=resnet18"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="optim.batch_size = 4096"):
        train(tiny(tmp_path, "optim.batch_size=4096"))
    assert not (tmp_path / "run").exists()
    assert train(tiny(tmp_path))["epochs"] == 3


def test_a_truncated_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    straight = train(tiny(tmp_path, "optim.epochs=4", name="straight"))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, "optim.epochs=4"), callbacks=[Crash(at=3)])
    run = tmp_path / "run"
    assert torch.load(run / PREVIOUS_CHECKPOINT, weights_only=False)["epoch"] == 2
    data = (run / CHECKPOINT).read_bytes()
    (run / CHECKPOINT).write_bytes(data[: len(data) // 2])  # a copy cut short
    resumed = train(tiny(tmp_path, "optim.epochs=4"))
    assert (
        f"{run / CHECKPOINT} is unreadable" in caplog.text
        and "resuming from checkpoint.prev.pt (epoch 2)" in caplog.text
    )
    assert strip(resumed) == strip(straight)
    for k, v in final_weights(tmp_path / "straight").items():
        assert torch.equal(v, final_weights(run)[k]), k

    (run / RESULTS).write_text('{"summary": {"test/acc')  # results.json cut short: evaluated again from the checkpoint
    assert strip(train(tiny(tmp_path, "optim.epochs=4"))) == strip(straight)
    assert f"{run / RESULTS} is unreadable" in caplog.text

    (run / RESULTS).unlink()
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        (run / name).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(
        RunDirError, match=rf"{run / CHECKPOINT} is unreadable.*To start this run over, move {run} aside"
    ):
        train(tiny(tmp_path, "optim.epochs=4"))


def test_schedule_is_constant_then_linear_then_constant():
    cfg = OptimConfig(lr=0.1, epochs=100, lr_ratio=0.01)
    assert lr_at(0, cfg) == lr_at(50, cfg) == 0.1
    assert lr_at(70, cfg) == pytest.approx(0.1 * (1 - 0.5 * 0.99))
    assert lr_at(90, cfg) == lr_at(99.9, cfg) == pytest.approx(0.001)
    warm = OptimConfig(lr=0.1, epochs=100, warmup_epochs=5)
    assert lr_at(0, warm) == 0.0 and lr_at(2.5, warm) == pytest.approx(0.05) and lr_at(5, warm) == 0.1
