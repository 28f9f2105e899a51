#!/usr/bin/env python3
"""One command that validates kdengine on a fresh GPU machine (``make gpu-check``).

GPU machines are lent rarely and briefly (about 15 minutes, start included; no network, no FFCV,
no omegaconf), so every stage is prepared here and runs in one call, within about 8 minutes:

  env      versions, the device, nvcc, the commit                          -> env.txt
  wheels   install the carried wheels (.whl/, from `make gpu-wheels`) with no index
  build    the CUDA extension for this device's arch (KDENGINE_FORCE_CUDA=1), then a check
           that the CUDA backend is really there                           -> build.log
  tests    every cuda-marked test; a skipped cuda test is a failure        -> tests.log
  ops      `kdengine bench ops` on the GPU (channels_last, bf16)           -> ops.csv
  step     `kdengine bench step` on the GPU                                -> step.csv
  train    a short captured-step `kdengine train` on CUDA, then its resume -> train.log
  summary  one line per stage, printed last                                -> summary.txt

A stage that fails is recorded and the script goes on. Everything is written into one folder
(``--out``, default ``$OUT`` when set, else ``gpu-check-out``), at most 8 files. The exit status
is 0 only when every stage passed.

``--preflight`` (``make gpu-preflight``, on a CPU machine) checks what can be checked without a
GPU: this script's stages are well-formed, the cuda tests collect, the carried wheels are there
and install offline into a scratch folder, and the ``.cu`` wrappers compile against torch's
headers.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".whl"
# Stage budgets in seconds; their sum stays under 8 minutes on an H100/H200 with 16 cores.
# They are time limits, not expectations: a stage that runs over is killed and recorded.
BUDGET = {"wheels": 20, "build": 170, "tests": 100, "ops": 40, "step": 110, "train": 40}
# What the benches run within their budgets: the step's compile provider compiles each case once
# (tens of seconds per teacher-student pair), so two cases and one method.
BENCH_ARGS = {
    "ops": "--channels-last --dtype bf16 --repeat 5",
    "step": "--cases cifar_r32x4_r8x4,imagenet_r34_r18_224 --methods dml+adm --repeat 5 --steps-per-window 10",
}


class Stage:
    def __init__(self, name: str):
        self.name, self.ok, self.note, self.seconds = name, None, "", 0.0


def run(cmd: str, log, timeout: float, env=None) -> tuple[int, str]:
    """Run ``cmd`` in the repository root; its output is appended to ``log`` and returned."""
    log.write(f"\n$ {cmd}\n")
    log.flush()
    try:
        proc = subprocess.run(cmd, shell=True, cwd=REPO, env=env or os.environ.copy(), timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, code = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out, code = out + f"\n[timed out after {timeout:.0f} s]\n", 124
    log.write(out)
    log.flush()
    return code, out


def tail(text: str, n: int = 1) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-200:]


def python() -> str:
    return shlex.quote(sys.executable)


def stage_env(out: Path, log) -> tuple[bool, str]:
    code, text = run(
        f"{python()} -c \"import torch, platform; print('python', platform.python_version()); "
        "print('torch', torch.__version__, 'cuda', torch.version.cuda); "
        "print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'); "
        "print('capability', torch.cuda.get_device_capability() if torch.cuda.is_available() else '')\"; "
        "nvcc --version | tail -n 2; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; "
        "git rev-parse --short=12 HEAD 2>/dev/null || echo 'commit unknown'; nproc",
        log, 60)
    has_gpu = "device none" not in text and code == 0
    return has_gpu, tail(text.split("device", 1)[-1], 1) if has_gpu else "no CUDA device visible to torch"


def stage_wheels(log) -> tuple[bool, str]:
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return True, "no carried wheels (.whl/ empty): nothing to install"
    code, text = run(f"{python()} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
                     f"--target /tmp/kdengine-site {' '.join(shlex.quote(str(w)) for w in wheels)}",
                     log, BUDGET["wheels"])
    return code == 0, f"{len(wheels)} wheels" if code == 0 else tail(text)


def stage_build(log, env) -> tuple[bool, str]:
    code, text = run(f"{python()} -m pip install -q --no-index --no-deps --no-build-isolation -e .", log,
                     BUDGET["build"], env)
    if code:
        return False, tail(text)
    code, text = run(f"{python()} -c \"import kdengine._extension as e; "
                     "assert e.HAS_CUDA_OPS, 'the CUDA backend was not built'; print('cuda ops', e.HAS_CUDA_OPS)\"",
                     log, 60, env)
    return code == 0, tail(text)


def stage_tests(log, env) -> tuple[bool, str]:
    code, text = run(f"{python()} -m pytest -m cuda -q -rs -p no:cacheprovider tests", log, BUDGET["tests"], env)
    skipped = re.findall(r"^SKIPPED .*$", text, flags=re.M)
    summary = tail(text)
    if skipped:
        return False, f"{len(skipped)} cuda test(s) skipped: {skipped[0][:120]}"
    return code == 0, summary


def stage_bench(kind: str, out: Path, log, env) -> tuple[bool, str]:
    csv = out / f"{kind}.csv"
    extra = BENCH_ARGS[kind]
    code, text = run(f"{python()} -m kdengine bench {kind} --device cuda {extra} --output {shlex.quote(str(csv))}",
                     log, BUDGET[kind], env)
    return code == 0 and csv.exists(), tail(text)


def stage_train(out: Path, log, env) -> tuple[bool, str]:
    runs = out.parent / "gpu-check-runs"  # outside $OUT: checkpoints must not come back
    common = (f"{python()} -m kdengine train --device cuda --output-dir {shlex.quote(str(runs))} --run-name gpu "
              "--quiet train.epochs=2 data.embedded.train_per_class=500 data.embedded.val_per_class=100")
    code, text = run(f"{common} train.max_steps=60", log, BUDGET["train"] / 2, env)
    if code:
        return False, "first part: " + tail(text)
    code, text = run(f"{common} --resume auto", log, BUDGET["train"] / 2, env)
    return code == 0, tail(text)


def preflight() -> int:
    """What a CPU machine can check of the GPU run."""
    failures = 0
    checks = [
        ("cuda tests collect", f"{python()} -m pytest -m cuda --collect-only -q -p no:cacheprovider tests"),
        ("cuda kernels compile (nvcc, sm_80/sm_90)", "bash .ci/check_cuda_kernels.sh"),
        (".cu wrappers compile against torch's headers", f"{python()} .ci/compile_cu_wrappers.py"),
    ]
    wheels = sorted(WHEELS.glob("*.whl"))
    if wheels:
        checks.append(("carried wheels install offline",
                       f"rm -rf /tmp/kdengine-preflight-site && {python()} -m pip install -q --no-index --no-deps "
                       f"--target /tmp/kdengine-preflight-site {' '.join(shlex.quote(str(w)) for w in wheels)} && "
                       "PYTHONPATH=/tmp/kdengine-preflight-site python3 -c 'import omegaconf'"))
    else:
        print("preflight: FAIL  carried wheels: .whl/ is empty; run `make gpu-wheels`")
        failures += 1
    for what, cmd in checks:
        t0 = time.time()
        proc = subprocess.run(cmd, shell=True, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ok = proc.returncode == 0
        failures += not ok
        print(f"preflight: {'ok  ' if ok else 'FAIL'}  {what} ({time.time() - t0:.0f} s): {tail(proc.stdout)}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="output folder")
    parser.add_argument("--preflight", action="store_true", help="the CPU-side checks only")
    args = parser.parse_args(argv)
    if args.preflight:
        return preflight()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    if (WHEELS).is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, ["/tmp/kdengine-site", env.get("PYTHONPATH")]))
    env.update(KDENGINE_FORCE_CUDA="1", KDENGINE_REQUIRE_EXTENSION="1", PYTHONUNBUFFERED="1",
               MAX_JOBS=str(os.cpu_count() or 8))
    stages: list[Stage] = []
    t_start = time.time()

    def record(name, fn, *a):
        s = Stage(name)
        t0 = time.time()
        try:
            s.ok, s.note = fn(*a)
        except Exception as exc:  # a broken stage is recorded; the others still run
            s.ok, s.note = False, f"{type(exc).__name__}: {exc}"
        s.seconds = time.time() - t0
        stages.append(s)
        print(f"[{time.time() - t_start:5.0f} s] {name}: {'ok' if s.ok else 'FAILED'} - {s.note}", flush=True)
        return s.ok

    with open(out / "env.txt", "w") as log:
        has_gpu = record("env", stage_env, out, log)
    with open(out / "build.log", "w") as log:
        record("wheels", stage_wheels, log)
        if has_gpu:
            try:
                import torch

                major, minor = torch.cuda.get_device_capability()
                env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            except Exception:  # the build stage reports what is wrong
                pass
        built = record("build", stage_build, log, env)
    if has_gpu and built:
        with open(out / "tests.log", "w") as log:
            record("tests", stage_tests, log, env)
        with open(out / "bench.log", "w") as log:
            record("bench ops", stage_bench, "ops", out, log, env)
            record("bench step", stage_bench, "step", out, log, env)
        with open(out / "train.log", "w") as log:
            record("train + resume", stage_train, out, log, env)
    lines = [f"{s.name:<15} {'ok' if s.ok else 'FAILED':<7} {s.seconds:6.0f} s  {s.note}" for s in stages]
    if not (has_gpu and built):
        lines.append("tests, benches and training were not run: " + ("no GPU" if not has_gpu else "the build failed"))
    lines.append(f"total {time.time() - t_start:.0f} s; output in {out}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n== gpu-check summary ==\n" + "\n".join(lines))
    return 0 if stages and all(s.ok for s in stages) and has_gpu and built else 1


if __name__ == "__main__":
    sys.exit(main())
