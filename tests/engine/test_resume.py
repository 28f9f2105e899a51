"""Resuming never touches the wrong run: which run `train.resume=auto` continues, what it refuses,
and the configuration check against the checkpoint's."""
import pytest
from omegaconf import OmegaConf

from kdengine.engine import ConfigError, Trainer, load_config
from kdengine.engine import checkpoint as ckpt
from kdengine.engine.trainer import default_run_name


def _trainer(overrides):
    return Trainer(load_config(overrides=overrides), progress=False)


def _fake_run(run_dir, tiny, epoch, epochs=2, **config):
    """A run directory whose checkpoint says where the run stands (enough to choose a run; not to load)."""
    cfg = OmegaConf.to_container(load_config(overrides=tiny + [f"train.epochs={epochs}"]))
    for key, value in config.items():
        section, name = key.split(".")
        cfg[section][name] = value
    ckpt.save_atomic({"epoch": epoch, "step_in_epoch": 1 if epoch < epochs else 0, "global_step": 7,
                      "config": cfg}, run_dir / ckpt.LAST)
    (run_dir / "config.yaml").write_text("the record of this run\n")


@pytest.fixture
def name(tiny):
    return default_run_name(load_config(overrides=tiny))


def test_auto_continues_the_one_stopped_run_of_the_default_name(tiny, tmp_path, name):
    """The user's report: `<name>` finished, `<name>-2` stopped; `--resume auto` continues -2."""
    runs = tmp_path / "runs"
    _fake_run(runs / name, tiny, epoch=2)
    _fake_run(runs / f"{name}-2", tiny, epoch=0)
    _fake_run(runs / f"{name}-x", tiny, epoch=0)  # another name: not a candidate
    trainer = Trainer.__new__(Trainer)  # only the run-directory choice, without building a run
    trainer.cfg = load_config(overrides=tiny + ["train.resume=auto"])
    assert trainer._locate_run() == runs / f"{name}-2"
    assert trainer.resume_from == runs / f"{name}-2" / ckpt.LAST
    assert (runs / name / "config.yaml").read_text() == "the record of this run\n"


def test_auto_refuses_when_several_runs_are_stopped(tiny, tmp_path, name):
    runs = tmp_path / "runs"
    _fake_run(runs / name, tiny, epoch=0)
    _fake_run(runs / f"{name}-3", tiny, epoch=1)
    with pytest.raises(ConfigError, match=rf"2 stopped runs match, .*{name} \(stopped in epoch 1/2.*"
                                          rf"{name}-3 \(stopped in epoch 2/2.*train.run_name="):
        _trainer(tiny + ["train.resume=auto"])


def test_nothing_to_resume_is_an_error_unless_auto_or_new(tiny, tmp_path, name):
    with pytest.raises(ConfigError, match="nothing to resume .*no run .* holds a checkpoint.*auto-or-new"):
        _trainer(tiny + ["train.resume=auto"])
    _fake_run(tmp_path / "runs" / name, tiny, epoch=2)
    with pytest.raises(ConfigError, match=rf"nothing to resume \(.*{name} finished all 2 epochs\)"):
        _trainer(tiny + ["train.resume=auto"])
    trainer = _trainer(tiny + ["train.resume=auto-or-new"])  # a new run, numbered: the finished one stays
    assert trainer.resume_from is None and trainer.run_dir.name == f"{name}-2"
    assert (tmp_path / "runs" / name / "config.yaml").read_text() == "the record of this run\n"


def test_a_finished_run_is_never_resumed_nor_rewritten(tiny, tmp_path):
    run = tmp_path / "runs" / "done"
    _fake_run(run, tiny, epoch=2)
    for resume in ("train.resume=auto", f"train.resume={run}", f"train.resume={run / ckpt.LAST}"):
        with pytest.raises(ConfigError, match="finished all 2 epochs"):
            _trainer(tiny + ["train.run_name=done", resume])
    with pytest.raises(FileExistsError, match="holds a finished run; choose another train.run_name"):
        _trainer(tiny + ["train.run_name=done"])
    assert (run / "config.yaml").read_text() == "the record of this run\n"


def test_resume_checks_the_configuration_against_the_checkpoint(tiny, capsys):
    stopped = _trainer(tiny + ["train.run_name=r", "train.max_steps=2"])
    stopped.fit()
    capsys.readouterr()
    resume = tiny + ["train.run_name=r", "train.resume=auto"]
    with pytest.raises(ConfigError, match=r"^train.resume: .*checkpoint.pt was saved by another set-up "
                                          r"\(models.1.name=resnet8 there, resnet20 here\); .*config.yaml"):
        _trainer(resume + ["models.1.name=resnet20"])
    with pytest.raises(ConfigError, match=r"method.name=dml\+adm there, dml here"):
        _trainer(resume + ["method.name=dml"])
    trainer = _trainer(resume + ["train.epochs=3", "train.log_every=3"])
    said = capsys.readouterr().out
    assert f"resuming {trainer.run_dir} in epoch 1/3 at step 2 of {trainer.steps_per_epoch}" in said
    assert ("changed since its checkpoint: train.epochs 2 -> 3, train.log_every 2 -> 3, train.max_steps 2 -> null"
            in said)
    assert trainer.global_step == 2


def test_a_refused_resume_is_reported_before_the_data_and_models_are_built(tiny, tmp_path, monkeypatch):
    from kdengine.engine import trainer as trainer_module

    def no_data(*args, **kwargs):
        raise AssertionError("the data were set up before the run directory was checked")

    monkeypatch.setattr(trainer_module, "build_loaders", no_data)
    with pytest.raises(ConfigError, match="nothing to resume"):
        _trainer(tiny + [f"train.output_dir={tmp_path}", "train.run_name=none", "train.resume=auto"])


def test_a_failed_set_up_leaves_no_empty_run_directory(tiny, tmp_path, monkeypatch):
    from kdengine.engine import trainer as trainer_module

    def broken(*args, **kwargs):
        raise RuntimeError("data set-up failed")

    monkeypatch.setattr(trainer_module, "build_loaders", broken)
    with pytest.raises(RuntimeError, match="data set-up failed"):
        _trainer(tiny + [f"train.output_dir={tmp_path}", "train.run_name=fresh"])
    assert not (tmp_path / "fresh").exists()
