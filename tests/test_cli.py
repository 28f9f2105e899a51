import csv

import pytest
import torch

from kdengine import cli
from kdengine.ops import available_impls


def test_info_reports_build(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "ffcv" in out
    if "cpu" in available_impls(torch.device("cpu")):
        assert "compiled backends" in out and "CPU buffer cache" in out


def test_bench_ops_appends_rows(tmp_path, capsys):
    out_csv = tmp_path / "ops.csv"
    argv = ["bench", "ops", "--cases", "cifar_r32x4_r8x4", "--ops", "feature_mse", "--modes", "fwd,fwdbwd",
            "--providers", "reference-eager", "--repeat", "2", "--output", str(out_csv)]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0  # appends under the same header
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 4
    row = rows[0]
    for column in ("commit", "torch_version", "device_name", "median_ms", "p20_ms", "p80_ms", "gbps",
                   "pct_copy_bw", "speedup_vs_eager"):
        assert row[column] != "", column
    assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
    assert row["speedup_vs_eager"] == "1.0"


def test_bench_rejects_unknown_names(capsys):
    assert cli.main(["bench", "ops", "--cases", "mnist", "--no-save"]) == 2
    assert "unknown cases ['mnist']" in capsys.readouterr().err
    assert cli.main(["bench", "ops", "--providers", "fortran", "--no-save"]) == 2


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "info" in capsys.readouterr().out
