"""The training engine on tiny runs: outputs, exact resume, determinism, stops, offline teachers."""
import json
import os
import signal

import pytest
import torch

from kdengine.engine import NonFiniteLossError, RunStatus, Trainer, load_config
from kdengine.engine import checkpoint as ckpt
from kdengine.engine.evaluate import evaluate_checkpoint


def _train(overrides, **kw):
    trainer = Trainer(load_config(overrides=overrides), progress=False)
    return trainer, trainer.fit(**kw)


def _weights(trainer):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in trainer.models]


def _assert_same_weights(a, b):
    for wa, wb in zip(a, b):
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), key


def test_a_run_writes_its_directory(tiny):
    trainer, summary = _train(tiny + ["train.run_name=full"])
    run = trainer.run_dir
    assert summary["status"] == "completed" and summary["epoch"] == 2
    assert summary["global_step"] == 2 * trainer.steps_per_epoch
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "curves.png"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["epoch"] for r in val] == [0, 1]
    for tag in ("teacher", "student", "ensemble"):
        assert 0 <= val[-1][f"{tag}/top1"] <= 100 and val[-1][f"{tag}/top5"] >= val[-1][f"{tag}/top1"]
        assert summary["best"][tag] == max(r[f"{tag}/top1"] for r in val)
    train = [r for r in records if r["split"] == "train"]
    assert all(r["loss"] > 0 for r in train)
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,split,step")
    state = ckpt.load(run / "checkpoint.pt")
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0
    # `kdengine eval` sets the run up as training did: the same numbers as the last evaluation
    evaluated = evaluate_checkpoint(run / "checkpoint.pt")
    assert evaluated["tags"] == trainer.tags and evaluated["epoch"] == 2
    assert evaluated["metrics"] == pytest.approx({k: v for k, v in val[-1].items() if "/" in k}, rel=1e-6)


def test_runs_are_deterministic_and_resume_exactly(tiny):
    full, _ = _train(tiny + ["train.run_name=a"])
    again, _ = _train(tiny + ["train.run_name=b"])
    _assert_same_weights(_weights(full), _weights(again))

    k = full.steps_per_epoch + 1  # stop inside the second epoch
    stopped, summary = _train(tiny + ["train.run_name=c", f"train.max_steps={k}"])
    assert summary["status"] == "max_steps" and summary["global_step"] == k
    resumed, summary = _train(tiny + ["train.run_name=c", "train.resume=auto"])
    assert summary["status"] == "completed" and summary["global_step"] == 2 * full.steps_per_epoch
    _assert_same_weights(_weights(full), _weights(resumed))
    records = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in records] == [(0, "train"), (0, "val"), (1, "train"), (1, "val")]


def test_ctrl_c_saves_and_resume_continues(tiny, monkeypatch):
    trainer = Trainer(load_config(overrides=tiny + ["train.run_name=int"]), progress=False)
    step = trainer.train_step

    def step_then_interrupt(*args):
        out = step(*args)
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C delivers
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    summary = trainer.fit()
    assert summary["status"] == "interrupted" and summary["global_step"] == 3
    assert ckpt.load(trainer.run_dir / "checkpoint.pt")["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed, summary = _train(tiny + ["train.run_name=int", "train.resume=auto"])
    assert summary["status"] == "completed" and summary["global_step"] == 2 * resumed.steps_per_epoch


def test_request_stop_ends_the_run_after_the_current_step(tiny, monkeypatch):
    trainer = Trainer(load_config(overrides=tiny + ["train.run_name=stop"]), progress=False)
    step = trainer.train_step

    def step_then_stop(*args):
        out = step(*args)
        if trainer.global_step == 1:  # inside the second step (the count moves on after it)
            trainer.request_stop()
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_stop)
    summary = trainer.fit()
    assert summary["status"] is RunStatus.INTERRUPTED and summary["global_step"] == 2
    assert json.loads(json.dumps(summary))["status"] == "interrupted" == f"{summary['status']}"
    state = ckpt.load(trainer.run_dir / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, monkeypatch):
    trainer = Trainer(load_config(overrides=tiny + ["train.run_name=nan"]), progress=False)
    forward = trainer.method.forward

    def poisoned(outputs, target, indices=None):
        out = forward(outputs, target, indices)
        if trainer.epoch == 1:
            return out._replace(total=out.total * float("nan"))
        return out

    monkeypatch.setattr(trainer.method, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at epoch 2/2.*last good checkpoint"):
        trainer.fit()
    state = ckpt.load(trainer.run_dir / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0  # the end of epoch 0, untouched
    assert all(torch.isfinite(v).all() for m in state["models"] for v in m.values() if v.is_floating_point())


def test_offline_teacher_needs_weights_and_stays_frozen(tiny):
    with pytest.raises(ValueError, match="models.0.checkpoint"):
        Trainer(load_config(overrides=tiny + ["method.name=kd"]), progress=False)
    teacher_run, _ = _train(tiny + ["train.run_name=teacher", "method.name=vanilla"])
    path = teacher_run.run_dir / "checkpoint.pt"
    student_run, summary = _train(tiny + ["train.run_name=kd", "method.name=kd+adm",
                                          f"models.0.checkpoint={path}"])
    assert summary["status"] == "completed"
    _assert_same_weights([_weights(teacher_run)[0]], [_weights(student_run)[0]])
    assert not any(p.requires_grad for p in student_run.models[0].parameters())


def test_existing_run_is_not_overwritten(tiny):
    _train(tiny + ["train.run_name=same", "train.max_steps=1"])
    with pytest.raises(FileExistsError, match=r"holds a stopped run \(stopped in epoch 1/2.*train.resume=auto"):
        Trainer(load_config(overrides=tiny + ["train.run_name=same"]), progress=False)


@pytest.mark.cuda
def test_cuda_graph_step_matches_the_eager_step_closely(tiny):
    """On a GPU the captured step trains like the eager one (bf16 autocast both; not bit-equal)."""
    cuda = [o for o in tiny if not o.startswith("train.device")] + ["train.device=cuda", "train.epochs=1"]
    graph, summary_graph = _train(cuda + ["train.run_name=graph"])
    eager, summary_eager = _train(cuda + ["train.run_name=eager", "train.cuda_graph=false"])
    assert graph.step.captured is not None and graph.step.captured.graphs  # captured and replayed
    assert eager.step.captured is None
    for tag in ("teacher", "student"):
        assert abs(summary_graph["last"][f"{tag}/loss"] - summary_eager["last"][f"{tag}/loss"]) < 0.5
