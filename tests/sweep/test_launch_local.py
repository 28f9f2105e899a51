"""The local launcher with two processes sweeping into one folder."""
from kdengine.sweep.launch import LocalLauncher
from kdengine.sweep.plan import plan_runs
from kdengine.sweep.status import run_state

from .fakes import fake_run


def test_a_run_finished_by_another_process_is_skipped(tmp_path):
    (run,) = plan_runs(["method.name=kd,", "train.seed=0,"])
    run_dir = fake_run(tmp_path / run.name, ["method.name=kd", "train.seed=0"], {"student": 30.0})
    assert run_state(run_dir)["status"] == "completed"  # finished while this sweep waited
    said = []
    # The command would fail if it ran (a finished run's folder is refused): it must not run.
    results = LocalLauncher().launch([(run, ["false"], run_dir)], said.append)
    assert results == {} and "finished meanwhile" in said[0]
    assert run_state(run_dir)["status"] == "completed"
