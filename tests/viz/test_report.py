"""The HTML report: self-contained (images as data URIs), its tables, and in headless Chromium
every image decoded (naturalWidth > 0)."""
import base64
import html
import json
import os
import re
import shutil
import subprocess

import pytest

from kdengine.viz.report import write_report

_PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tiny_runs):
    return write_report([tiny_runs["adm"], tiny_runs["dml"]], tiny_runs["root"] / "report.html", device="cpu",
                        images=2, iou_images=16)


def test_report_is_self_contained(report, tiny_runs):
    page = report.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    # comparison, then per run: curves, maps, IoU (the DML run: last checkpoint only), calibration
    assert len(sources) == 1 + 4 + 4
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == _PNG
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count('class="final"') == 2 and "Configuration (resolved)" in page
    assert "teacher~student: ADM connector" in page and "teacher~student: least squares" in page
    assert "kdengine (that wrote the checkpoint)" in page and "torch" in page


def _chromium():
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                      shutil.which("google-chrome")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({images, finalRows: document.querySelectorAll("table.final tbody tr").length,
                                      tables: document.querySelectorAll("table").length});
  document.body.appendChild(probe);
});
</script>"""


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium; .ci/run installs it when root)")
    page = tmp_path / "probe.html"  # a copy with a probe script: the report itself has none
    broken = '<img src="data:image/png;base64,AAAA" alt="a control that cannot load">'  # the check can fail
    page.write_text(report.read_text().replace("</body>", broken + _PROBE + "</body>"))
    command = [browser, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
               page.as_uri()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no probe in Chromium's DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    probe = json.loads(html.unescape(found.group(1)))
    *images, control = probe["images"]
    assert len(images) == 9 and control[1] == 0
    assert all(complete and width > 0 and height > 0 for complete, width, height in images), probe
    assert probe["finalRows"] == 2 * 3  # teacher, student, ensemble per run
    assert probe["tables"] >= 4


def test_report_of_a_sweep_folder(tmp_path):
    from kdengine.sweep import plan_runs
    from kdengine.sweep.plan import merge_plan
    from tests.sweep.fakes import fake_run

    runs = plan_runs(["method.name=dml,dml+adm", "train.seed=0,1"])
    merge_plan(tmp_path, None, runs)
    for i, run in enumerate(runs[:3]):  # the last one never started
        fake_run(tmp_path / run.name, run.overrides, {"teacher": 50.0 + i, "student": 40.0 + i})
    page = write_report([tmp_path]).read_text()
    assert (tmp_path / "report.html").is_file()
    assert 'class="sweep"' in page and "<td>dml</td><td>2</td><td>50.50 ± 0.71</td>" in page
    assert "1/2 (1 missing)" in page and "method.name=dml+adm_train.seed=1: missing (not started)" in page
    assert page.count('<img src="data:image/png;base64,') == 1  # the runs' curves, seeds as bands
