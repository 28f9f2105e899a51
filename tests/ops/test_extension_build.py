"""How the compiled extension was built: its CPU kernels must use torch's intra-op threads."""
import sys

import pytest
import torch

from kdengine import _extension


@pytest.mark.skipif(not _extension.HAS_CPU_OPS, reason="extension not built")
@pytest.mark.skipif(sys.platform != "linux" or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch's parallel backend here is not OpenMP")
def test_cpu_kernels_are_built_with_openmp():
    # Without -fopenmp, at::parallel_for (a header template) compiles to a serial loop: every
    # kernel then ran on one thread whatever torch.get_num_threads() said.
    assert _extension.BUILD_INFO["openmp"] is True


def test_info_reports_the_thread_count():
    from kdengine.info import report

    rows = dict(report())
    assert rows["CPU threads"].startswith(str(torch.get_num_threads()))
