"""`kdengine bench step`: images per second of whole training steps (forwards, losses, backward,
optimizer step) of a teacher-student pair, for the ways a user could run that step.

Providers, all timed in one run, interleaved (a shared machine's drift lands on all alike):

* ``eager-fp32`` — the public KD codebases' loop (mdistiller style): fp32, NCHW, Algorithm 1's
  unfused ADM (the ops' pure-PyTorch reference), ``torch.optim.SGD`` with its defaults.
* ``eager-bf16`` — the same with bf16 autocast and channels_last (on CPU too, where it is rarely
  faster: it is the baseline a GPU user would pick).
* ``compile`` — the engine's precision and layout with the forwards and losses (Algorithm 1's ADM)
  under ``torch.compile``.
* ``kdengine`` — the engine's :class:`~kdengine.engine.step.JointStep` as ``kdengine train``
  runs it: fused ADM ops, fused SGD with the learning rate on the device, bf16 channels_last and
  the captured CUDA graph on GPUs; fp32 NCHW eager on CPUs.

Each row has the median milliseconds per step over timed windows of several back-to-back steps
(CUDA events on GPU), images per second, the model FLOPs utilisation (FLOPs of one step counted by
``torch.utils.flop_counter`` over the device's matrix-multiply rate measured in the provider's
compute dtype) and, on CUDA, the step's peak memory above what the models and optimizer hold.
"""
from __future__ import annotations

import dataclasses
import gc
import resource
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..engine.setup import Precision
from ..engine.step import JointStep, build_optimizer
from ..errors import SettingError
from ..methods import build_method
from ..models import create_model
from .results import append_rows, bench_device, provenance
from .timing import measure, measure_interleaved

PROVIDERS = ("eager-fp32", "eager-bf16", "compile", "kdengine")
METHODS = ("dml+adm", "kd+adm")


@dataclass(frozen=True)
class StepCase:
    name: str
    teacher: str
    student: str
    batch: int
    size: int  # the image height (and width unless ``width`` is set)
    num_classes: int
    preset: str  # the method presets' hyper-parameters: "cifar", "imagenet" or "segmentation"
    task: str = "classification"  # segmentation: random label maps, a tenth of the pixels ignored
    width: Optional[int] = None
    kwargs: tuple = ({}, {})  # the teacher's and the student's constructor options

    @property
    def shape(self) -> tuple[int, int]:
        return self.size, self.width or self.size


CASES = {
    "cifar_r32x4_r8x4": StepCase("cifar_r32x4_r8x4", "resnet32x4", "resnet8x4", 128, 32, 100, "cifar"),
    "imagenet_r34_r18_224": StepCase("imagenet_r34_r18_224", "resnet34", "resnet18", 256, 224, 1000, "imagenet"),
    "imagenet_r34_r18_160": StepCase("imagenet_r34_r18_160", "resnet34", "resnet18", 256, 160, 1000, "imagenet"),
    # The embedded default run: WRN-16-2 -> ResNet-8 at 16 px, 10 classes, batch 128.
    "embedded": StepCase("embedded", "wrn_16_2", "resnet8", 128, 16, 10, "cifar"),
    # Segmentation (dml+adm only): configs/embedded/segmentation.yaml's pair at 48 px, and the ADM
    # paper's Table 5 pair on Cityscapes crops (2 per GPU: the 8-GPU recipe's batch 8 x 2 would not
    # fit a CPU; the GPU check leaves it out of its time budget: compiling R101 takes minutes).
    "embedded_seg": StepCase("embedded_seg", "deeplabv3_resnet101", "deeplabv3_resnet18", 32, 48, 4, "segmentation",
                             task="segmentation", kwargs=({"width": 8, "head_channels": 32},) * 2),
    "cityscapes_dlv3_r101_r18": StepCase("cityscapes_dlv3_r101_r18", "deeplabv3_resnet101", "deeplabv3_resnet18", 2,
                                         512, 19, "segmentation", task="segmentation", width=1024),
}
#: Cases run when none are named: the ImageNet and Cityscapes ones only on a GPU (minutes per step
#: on 2 cores).
DEFAULT_CASES = {"cpu": ("embedded", "cifar_r32x4_r8x4"), "cuda": tuple(CASES)}
#: The methods a segmentation case runs (the offline ones have no segmentation form).
SEGMENTATION_METHODS = ("dml+adm",)


@dataclass
class StepBenchConfig:
    device: torch.device
    cases: Sequence[str]
    methods: Sequence[str] = METHODS
    providers: Sequence[str] = PROVIDERS
    repeat: int = 5  # timed windows per provider
    steps_per_window: int = 5
    warmup: int = 4  # untimed steps first (a CUDA graph is captured after 3)
    batch: Optional[int] = None  # overrides each case's batch size
    output: Optional[str] = None


def make_config(*, device: Optional[str] = None, cases: Optional[Sequence[str]] = None,
                methods: Optional[Sequence[str]] = None, providers: Optional[Sequence[str]] = None,
                repeat: int = 5, steps_per_window: int = 5, warmup: int = 4, batch: Optional[int] = None,
                output=None) -> StepBenchConfig:
    """Check a selection by name and fill in the defaults.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (default: CUDA when available).
        cases: names from :data:`CASES` (default: :data:`DEFAULT_CASES` of the device type).
        methods: names from :data:`METHODS` (default: both).
        providers: names from :data:`PROVIDERS` (default: all).
        repeat: timed windows per provider, at least 1.
        steps_per_window: back-to-back steps in one timed window, at least 1.
        warmup: untimed steps per provider first (compilation; on CUDA the graph is captured
            after 3), at least 0.
        batch: a batch size for every case instead of each case's own.
        output: the CSV to append to, or None for none.

    Returns:
        The :class:`StepBenchConfig`.

    Raises:
        SettingError: an unknown name or an out-of-range count.
    """
    dev = bench_device(device)
    selection = {}
    for name, values, valid, default in (("cases", cases, tuple(CASES), DEFAULT_CASES[dev.type]),
                                         ("methods", methods, METHODS, METHODS),
                                         ("providers", providers, PROVIDERS, PROVIDERS)):
        values = list(values) if values else list(default)
        unknown = [v for v in values if v not in valid]
        if unknown:
            raise SettingError(name, f"has unknown names {unknown}; valid: {list(valid)}")
        selection[name] = values
    for name, value, low in (("repeat", repeat, 1), ("steps_per_window", steps_per_window, 1),
                             ("warmup", warmup, 0), ("batch", batch if batch is not None else 1, 1)):
        if value < low:
            raise SettingError(name, f"must be at least {low}, got {value}")
    return StepBenchConfig(dev, selection["cases"], selection["methods"], selection["providers"], repeat,
                           steps_per_window, warmup, batch, output)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's measured matrix-multiply rate in ``dtype`` (TFLOP/s): the denominator of MFU.

    Args:
        device: where to measure.
        dtype: the compute dtype.

    Returns:
        Median TFLOP/s of a square matmul (8192 on GPU, 2048 on CPU).
    """
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = measure(lambda: a @ b, device, warmup=2, repeat=7)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12


def count_step_flops(step: JointStep, images, labels) -> int:
    """FLOPs of one step's forwards and backward (the optimizer's elementwise work is not
    counted, as MFU conventions have it), counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step.eager(images, labels)
    return int(counter.get_total_flops())


class _Provider:
    """One provider's models, method, optimizer and step for a (case, method)."""

    def __init__(self, provider: str, case: StepCase, method_name: str, device: torch.device, seed: int = 0):
        on_cuda = device.type == "cuda"
        if provider == "eager-fp32":
            precision, impl = Precision(device, None, False), "reference"
        elif provider == "eager-bf16":
            precision, impl = Precision(device, torch.bfloat16, True), "reference"
        else:  # the engine's rule: bf16 channels_last on CUDA, fp32 NCHW elsewhere
            precision = Precision(device, torch.bfloat16 if on_cuda else None, on_cuda)
            impl = "reference" if provider == "compile" else None
        torch.manual_seed(seed)
        self.models = nn.ModuleList([create_model(case.teacher, num_classes=case.num_classes, **case.kwargs[0]),
                                     create_model(case.student, num_classes=case.num_classes, **case.kwargs[1])])
        self.models.to(device, memory_format=precision.memory_format)
        self.method = build_method(method_name, list(self.models), roles=("teacher", "student"),
                                   num_classes=case.num_classes, preset=case.preset, task=case.task,
                                   adm={"impl": impl}).to(device)
        for model, trainable in zip(self.models, self.method.trainable):
            model.requires_grad_(trainable)
            model.train(trainable)
        self.method.start_epoch(0, 1)
        lr, momentum, wd = 0.1, 0.9, (5e-4 if case.preset == "cifar" else 1e-4)
        if provider.startswith("eager"):
            params = [p for m in (*self.models, self.method) for p in m.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
        else:
            from types import SimpleNamespace

            cfg = SimpleNamespace(lr=lr, momentum=momentum, nesterov=False, weight_decay=wd)
            optimizer = build_optimizer(cfg, self.models, [None, None], self.method.trainable, self.method, device)
        self.precision = precision
        self.step = JointStep(self.models, self.method, optimizer, precision, ["teacher", "student"],
                              cuda_graph=provider == "kdengine", compile=provider == "compile")
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(case.batch, 3, *case.shape, generator=gen)
        self.images = images.to(device=device, dtype=precision.input_dtype).contiguous(
            memory_format=precision.memory_format)
        if case.task == "segmentation":
            labels = torch.randint(0, case.num_classes, (case.batch, *case.shape), generator=gen)
            labels[torch.rand(labels.shape, generator=gen) < 0.1] = 255
        else:
            labels = torch.randint(0, case.num_classes, (case.batch,), generator=gen)
        self.labels = labels.to(device)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step(self.images, self.labels)


def run(config: StepBenchConfig, progress=None) -> list[dict]:
    """Measure every (case, method, provider); the rows are returned and appended to
    ``config.output`` when set.

    Args:
        config: what to measure (from :func:`make_config`).
        progress: an optional ``rich`` Progress.

    Returns:
        One dict per measurement (the CSV's columns).
    """
    device = config.device
    base = provenance(device)
    rates = {}
    rows = []
    work = [(c, m) for c in config.cases for m in config.methods
            if CASES[c].task == "classification" or m in SEGMENTATION_METHODS]
    task = progress.add_task("bench step", total=len(work)) if progress else None
    for case_name, method_name in work:
        case = CASES[case_name]
        if config.batch:
            case = dataclasses.replace(case, batch=config.batch)
        if progress:
            progress.update(task, description=f"{case_name} {method_name}")
        providers = {p: _Provider(p, case, method_name, device) for p in config.providers}
        first = next(iter(providers.values()))
        flops = count_step_flops(first.step, first.images, first.labels)
        memory = {}
        for name, prov in providers.items():  # warm-up (compilation, capture) and step memory
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                held = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            prov.run(config.warmup)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                memory[name] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
        k = config.steps_per_window
        timings = measure_interleaved({n: ((lambda p=p: p.run(k)), None) for n, p in providers.items()}, device,
                                      warmup=1, repeat=config.repeat)
        per_step = {n: t.median_ms / k for n, t in timings.items()}
        for name, prov in providers.items():
            dtype = prov.precision.autocast_dtype or torch.float32
            if (device.type, dtype) not in rates:
                rates[(device.type, dtype)] = matmul_tflops(device, dtype)
            t = timings[name]
            ms = per_step[name]
            row = dict(base)
            row.update({
                "case": case.name, "method": method_name, "provider": name,
                "dtype": str(dtype).replace("torch.", ""),
                "layout": "channels_last" if prov.precision.channels_last else "contiguous",
                "cuda_graph": prov.step.use_cuda_graph, "batch": case.batch,
                "img_size": case.size if case.width is None else f"{case.size}x{case.width}",
                "teacher": case.teacher, "student": case.student,
                "steps_per_window": k, "windows": t.samples,
                "median_ms_per_step": round(ms, 3), "p20_ms_per_step": round(t.p20_ms / k, 3),
                "p80_ms_per_step": round(t.p80_ms / k, 3),
                "img_per_s": round(case.batch / (ms * 1e-3), 1),
                "speedup_vs_eager_fp32": round(per_step["eager-fp32"] / ms, 3) if "eager-fp32" in per_step else "",
                "speedup_vs_eager_bf16": round(per_step["eager-bf16"] / ms, 3) if "eager-bf16" in per_step else "",
                "gflop_per_step": round(flops / 1e9, 2),
                "matmul_tflops": round(rates[(device.type, dtype)], 2),
                "mfu_pct": round(100 * flops / (ms * 1e-3) / (rates[(device.type, dtype)] * 1e12), 2),
                "step_peak_mem_mb": round(memory[name], 1) if name in memory else "",
                "process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            })
            rows.append(row)
        del providers
        gc.collect()
        if progress:
            progress.advance(task)
    if config.output:
        append_rows(config.output, rows)
    return rows


def profile_step(case_name: str, method_name: str, device: torch.device, steps: int = 10, row_limit: int = 25) -> str:
    """Where the time of the ``kdengine`` provider's step goes: ``torch.profiler``'s table of the
    operators with the most self time over ``steps`` steps (after a warm-up).

    Args:
        case_name: a key of :data:`CASES`.
        method_name: ``dml+adm`` or ``kd+adm``.
        device: where to run.
        steps: profiled steps.
        row_limit: rows of the table.

    Returns:
        The table, as text.
    """
    if case_name not in CASES:
        raise SettingError("case", f"is unknown: {case_name!r}; valid: {list(CASES)}")
    if method_name not in METHODS:
        raise SettingError("method", f"is unknown: {method_name!r}; valid: {list(METHODS)}")
    prov = _Provider("kdengine", CASES[case_name], method_name, device)
    prov.run(4)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        prov.run(steps)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)
