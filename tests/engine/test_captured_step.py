"""The captured joint step trains as the eager one.

Two identical sets (same seed) of models, method and optimizer run the same batches, one through
``JointStep(cuda_graph=True)`` (three eager warm-up steps per input shape, then a capture, then
replays) and one through ``JointStep(cuda_graph=False)``; every step's metrics and, at the end,
every weight, buffer (BatchNorm statistics, ADM's previous-epoch buffers, SwitOKD's gates) and
optimizer state must agree tightly in fp32. In bf16 the eager step keeps autocast's cache of cast
weights, which a graph cannot (the cast would go stale): a weight used twice in a step (a head
that ADM applies again) then has its two gradients summed in bf16 rather than fp32, so the runs
drift apart by rounding; the replays must equal the same step run eagerly without the cache, and
stay within a loss tolerance of the cached one. Each run lasts three epochs of three steps, so
the replays cross two ``end_epoch`` calls. The CPU tests run the same harness eagerly (two runs
from one seed are bit-identical) and check the gated SwitOKD step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import pytest
import torch

from kdengine.engine import Trainer, load_config
from kdengine.engine.cuda_graph import CapturedStep
from kdengine.engine.setup import Precision
from kdengine.engine.step import JointStep, build_optimizer
from kdengine.methods import build_method
from kdengine.models import create_model

CLASSES = 4
SAMPLES = 24
BATCH = 8
SIZE = 16
EPOCHS = 3  # x 3 steps: 3 eager warm-up steps, then the capture, then 5 replays across two epoch ends
OPTIM = SimpleNamespace(name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4)
CPU = torch.device("cpu")

FP32 = {"rtol": 1e-5, "atol": 1e-5}
BF16 = {"rtol": 2e-2, "atol": 2e-3}
EXACT = {"rtol": 0.0, "atol": 0.0}
# bf16 with and without autocast's cache: the total loss of each step within this relative band
# (at most 5 % apart on the CPU over these nine steps)
BF16_CACHE_DRIFT = 0.1


def _confident_heads(models) -> None:
    """Heads whose predictions are their biases (zero weights): the teacher says class 0, with 27 %
    on class 1; the student says class 2. A batch labelled 0 puts SwitOKD's teacher in expert
    mode (paused: the gap between the two exceeds the threshold by about 0.4), a batch labelled 2
    in learning mode (the teacher is the one that is wrong). A small learning rate keeps them so."""
    with torch.no_grad():
        for model, bias in zip(models, ([10.0, 9.0, -10.0, -10.0], [-10.0, -10.0, 10.0, -10.0])):
            model.fc.weight.zero_()
            model.fc.bias.copy_(torch.tensor(bias))


SEG_KWARGS = ({"width": 8, "head_channels": 16}, {"width": 8, "head_channels": 8})


@dataclass(frozen=True)
class Case:
    """A method set-up: its name and options, the models (zoo names) and their roles."""

    method: str
    roles: tuple[str, ...]
    models: tuple[str, ...]
    options: dict = field(default_factory=dict)
    prepare: Optional[Callable] = None  # adjusts the freshly initialised models
    batch_labels: Optional[tuple[int, ...]] = None  # one label for every sample of batch k of an epoch
    shuffle: bool = True
    lr: Optional[float] = None  # every model's learning rate (default: OPTIM.lr)
    task: str = "classification"  # segmentation: label maps [B, SIZE, SIZE], models' kwargs below
    kwargs: tuple = ()  # per model, its constructor's options


CASES = {
    "dml+adm": Case("dml+adm", ("teacher", "student"), ("resnet8", "resnet8")),
    # the device-side switch: batches labelled 0, 2, 0 alternate the teacher's expert and learning modes
    "switokd+adm": Case("switokd+adm", ("teacher", "student"), ("resnet8", "resnet8"),
                        prepare=_confident_heads, batch_labels=(0, 2, 0), shuffle=False, lr=0.005),
    # Eq. 12's previous-epoch teacher predictions: a device buffer whose halves swap at end_epoch
    "dml+adm-di-kd": Case("dml+adm", ("teacher", "student"), ("resnet8", "resnet8"), {"adm": {"di": "kd"}}),
    # a frozen teacher: eval mode, no gradients, never stepped
    "kd+adm": Case("kd+adm", ("teacher", "student"), ("resnet8", "resnet8")),
    # three networks (1T2S) and ADM's connectors (a wider teacher)
    "dml+adm-1t2s": Case("dml+adm", ("teacher", "student", "student"), ("resnet8x4", "resnet8", "resnet8")),
    # segmentation: dense ADM (region pools, a head connector between 16 and 8 channels) and
    # SwitOKD's per-pixel switch with the pixel form, on label maps with ignored pixels
    "dml+adm-seg": Case("dml+adm", ("teacher", "student"), ("deeplabv3_resnet18", "pspnet_resnet18"),
                        task="segmentation", kwargs=SEG_KWARGS),
    "switokd+adm-seg-pixel": Case("switokd+adm", ("teacher", "student"), ("deeplabv3_resnet18", "pspnet_resnet18"),
                                  {"adm": {"dense": "pixel"}}, task="segmentation", kwargs=SEG_KWARGS),
}


@dataclass
class Run:
    models: list
    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: JointStep
    precision: Precision


def build(case: Case, precision: Precision, *, cuda_graph: bool, seed: int = 0) -> Run:
    """Models, method, optimizer and step as the trainer builds them (frozen models: no gradients,
    eval mode), from ``seed``."""
    device = precision.device
    torch.manual_seed(seed)
    kwargs = case.kwargs or ({},) * len(case.models)
    models = [create_model(name, num_classes=CLASSES, **kw).to(device, memory_format=precision.memory_format)
              for name, kw in zip(case.models, kwargs)]
    if case.prepare is not None:
        case.prepare(models)
    for module in (m for model in models for m in model.modules()):
        if isinstance(module, torch.nn.Dropout):  # the segmentation heads': masks from the global
            module.p = 0.0  # generator would differ between the runs compared step by step
    method = build_method(case.method, models, roles=case.roles, num_classes=CLASSES, num_samples=SAMPLES,
                          task=case.task, **case.options).to(device)
    for model, trainable in zip(models, method.trainable):
        if not trainable:
            model.requires_grad_(False)
        model.train(trainable)
    optimizer = build_optimizer(OPTIM, models, [case.lr] * len(models), method.trainable, method, device)
    step = JointStep(models, method, optimizer, precision, [f"model{i}" for i in range(len(models))],
                     cuda_graph=cuda_graph)
    return Run(models, method, optimizer, step, precision)


def dataset(case: Case, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """``SAMPLES`` images (in the loaders' dtype and layout) and labels, on the run's device."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(SAMPLES, 3, SIZE, SIZE, generator=gen)
    if case.task == "segmentation":  # label maps, a quarter of the pixels ignored
        labels = torch.randint(0, CLASSES, (SAMPLES, SIZE, SIZE), generator=gen)
        labels[torch.rand(labels.shape, generator=gen) < 0.25] = 255
    elif case.batch_labels is None:
        labels = torch.randint(0, CLASSES, (SAMPLES,), generator=gen)
    else:
        labels = torch.tensor(case.batch_labels).repeat_interleave(BATCH)
    images = images.to(precision.device, precision.input_dtype).contiguous(memory_format=precision.memory_format)
    return images, labels.to(precision.device)


def epoch_order(case: Case, epoch: int) -> torch.Tensor:
    """The sample indices of each batch of ``epoch``, ``[steps, BATCH]``."""
    if not case.shuffle:
        return torch.arange(SAMPLES).view(-1, BATCH)
    return torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(100 + epoch)).view(-1, BATCH)


def train(run: Run, case: Case, *, epochs: int = EPOCHS, batch: int = BATCH, scheduler=None,
          eager_path: bool = False) -> list[dict]:
    """``epochs`` epochs as the trainer runs them (start_epoch, the steps, end_epoch); each step's
    metrics and the method's optimizer gates, cloned. ``eager_path``: call ``JointStep.eager``
    (never captured, with the step's own autocast settings) rather than the step."""
    images, labels = dataset(case, run.precision)
    history = []
    for epoch in range(epochs):
        run.method.start_epoch(epoch, epochs)
        for rows in epoch_order(case, epoch):
            idx = rows[:batch].to(run.precision.device)
            x = images[idx].contiguous(memory_format=run.precision.memory_format)
            step = run.step.eager if eager_path else run.step
            metrics = {k: v.detach().clone() for k, v in step(x, labels[idx], idx).items()}
            gates = run.method.step_gates()
            if gates is not None:
                metrics["gates"] = gates.detach().clone()
            history.append(metrics)
            if scheduler is not None:
                scheduler.step()
        run.method.end_epoch(epoch)
    return history


def state(run) -> dict[str, torch.Tensor]:
    """Every weight and buffer of the models and the method, and the optimizer's state, of a
    :class:`Run` or a :class:`~kdengine.engine.Trainer` (the same attribute names)."""
    out = {f"model{i}.{k}": v for i, m in enumerate(run.models) for k, v in m.state_dict().items()}
    out.update({f"method.{k}": v for k, v in run.method.state_dict().items()})
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        out.update({f"optim.{i}.{k}": v for k, v in run.optimizer.state.get(p, {}).items() if torch.is_tensor(v)})
    return out


def assert_same(a, b, what: str, rtol: float, atol: float) -> None:
    """Two states (or step histories) agree key by key: floats within the tolerance (0: bit-equal),
    the rest exactly."""
    if isinstance(a, list):
        assert len(a) == len(b), f"{what}: {len(a)} steps vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what} step {i}", rtol, atol)
        return
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    for key in a:
        x, y = a[key], b[key]
        if x.is_floating_point() and (rtol or atol):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{what} {key}: {m}")
        else:
            assert torch.equal(x, y), f"{what} {key}: max difference {(x.double() - y.double()).abs().max().item()}"


def check_case_invariants(name: str, run: Run, history: list[dict], initial: dict[str, torch.Tensor]) -> None:
    """What each case is there to exercise did happen."""
    if name == "switokd+adm":  # the teacher paused (gate 0) on the batches labelled 0, learning on the others
        teacher_gates = [h["gates"][0].item() for h in history]
        assert teacher_gates == [0.0, 1.0, 0.0] * EPOCHS, teacher_gates
    if name == "dml+adm-di-kd":  # the last epoch read a full buffer of the one before
        adm = run.method.adm
        assert adm.parity.item() == EPOCHS % 2
        assert bool(adm.prev_valid_0.view(2, SAMPLES)[adm.parity].all())
    if name == "kd+adm":  # the frozen teacher's weights and statistics never moved
        teacher = {k: v for k, v in state(run).items() if k.startswith("model0.")}
        assert_same(teacher, {k: initial[k] for k in teacher}, "frozen teacher", **EXACT)


# ---------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("name", list(CASES))
def test_eager_steps_from_one_seed_are_bit_identical(name):
    """The harness the captured tests rely on: two builds from one seed train identically."""
    case = CASES[name]
    precision = Precision(CPU, None, False)
    a, b = build(case, precision, cuda_graph=False), build(case, precision, cuda_graph=False)
    initial = {k: v.clone() for k, v in state(a).items()}
    history_a, history_b = train(a, case), train(b, case)
    assert_same(history_a, history_b, "metrics", **EXACT)
    assert_same(state(a), state(b), "state", **EXACT)
    assert not a.step.use_cuda_graph and len(history_a) == EPOCHS * SAMPLES // BATCH
    check_case_invariants(name, a, history_a, initial)


def test_a_paused_switokd_teacher_keeps_its_weights_and_momentum():
    """SwitOKD's expert mode skips the teacher's optimizer step altogether: its parameters and
    SGD momentum (weight decay included) are those before the step; the student still steps."""
    case = CASES["switokd+adm"]
    run = build(case, Precision(CPU, None, False), cuda_graph=False)
    images, _ = dataset(case, run.precision)
    teacher, student = run.models
    x = images[:BATCH]

    def snapshot(model):
        params = [p.detach().clone() for p in model.parameters()]
        momentum = [run.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        return params, momentum

    def label(k):
        return torch.full((BATCH,), k)

    run.step(x, label(2))  # learning: both step, the momentum buffers now exist
    assert run.method.step_gates().tolist() == [1.0, 1.0]
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    run.step(x, label(0))  # expert: the teacher is paused
    assert run.method.step_gates().tolist() == [0.0, 1.0]
    for before, after in zip(teacher_before, snapshot(teacher)):
        assert all(torch.equal(u, v) for u, v in zip(before, after))
    assert not all(torch.equal(u, v) for u, v in zip(student_before[0], snapshot(student)[0]))
    run.step(x, label(2))  # learning again: the teacher moves on from where it paused
    assert run.method.step_gates().tolist() == [1.0, 1.0]
    assert not all(torch.equal(u, v) for u, v in zip(teacher_before[0], snapshot(teacher)[0]))


# ---------------------------------------------------------------------------------------- CUDA


@pytest.fixture
def gpu(monkeypatch):
    """The GPU, with cuDNN restricted to deterministic algorithms: the eager and the replayed
    runs then differ only where the captured step itself is wrong."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    return torch.device("cuda", torch.cuda.current_device())


PRECISIONS = {  # fp32 as contiguous NCHW; bf16 autocast as training on CUDA runs it (channels_last)
    "fp32": (None, False),
    "bf16": (torch.bfloat16, True),
}


@pytest.mark.cuda
@pytest.mark.parametrize("precision_name", list(PRECISIONS))
@pytest.mark.parametrize("name", list(CASES))
def test_replayed_steps_equal_eager_steps(gpu, name, precision_name):
    case = CASES[name]
    dtype, channels_last = PRECISIONS[precision_name]
    precision = Precision(gpu, dtype, channels_last)
    captured, eager = build(case, precision, cuda_graph=True), build(case, precision, cuda_graph=False)
    initial = {k: v.clone() for k, v in state(captured).items()}
    history_captured, history_eager = train(captured, case), train(eager, case)
    torch.cuda.synchronize()
    assert len(captured.step.captured.graphs) == 1 and eager.step.captured is None  # one shape, one graph
    check_case_invariants(name, captured, history_captured, initial)
    if dtype is None:
        assert_same(history_captured, history_eager, "metrics", **FP32)
        assert_same(state(captured), state(eager), "state", **FP32)
        return
    uncached = build(case, precision, cuda_graph=True)  # the captured step's own settings, run eagerly
    history_uncached = train(uncached, case, eager_path=True)
    torch.cuda.synchronize()
    assert uncached.step.captured is None
    assert_same(history_captured, history_uncached, "metrics", **BF16)
    assert_same(state(captured), state(uncached), "state", **BF16)
    for i, (x, y) in enumerate(zip(history_captured, history_eager)):
        drift = abs(x["loss"].item() - y["loss"].item()) / abs(y["loss"].item())
        assert drift <= BF16_CACHE_DRIFT, f"step {i}: loss {x['loss'].item()} captured, {y['loss'].item()} eager"


@pytest.mark.cuda
def test_replays_follow_the_learning_rate_schedule_without_recapture(gpu):
    """The learning rate lives in a device tensor the scheduler fills in place: the graph captured
    at the 4th step reads each later step's rate."""
    case = CASES["dml+adm"]
    precision = Precision(gpu, None, False)
    runs = [build(case, precision, cuda_graph=graph) for graph in (True, False)]

    def schedule(step):  # a rate that changes every step
        return 1.0 - 0.1 * step

    schedulers = [torch.optim.lr_scheduler.LambdaLR(run.optimizer, schedule) for run in runs]
    lr_tensors = [g["lr"] for g in runs[0].optimizer.param_groups]
    assert all(torch.is_tensor(lr) and lr.device.type == "cuda" for lr in lr_tensors)
    histories = [train(run, case, scheduler=s) for run, s in zip(runs, schedulers)]
    torch.cuda.synchronize()
    captured = runs[0].step.captured
    assert len(captured.graphs) == 1
    assert all(g["lr"] is lr for g, lr in zip(runs[0].optimizer.param_groups, lr_tensors))  # filled, not replaced
    steps = EPOCHS * SAMPLES // BATCH
    assert runs[0].optimizer.param_groups[0]["lr"].item() == pytest.approx(OPTIM.lr * schedule(steps))
    assert_same(histories[0], histories[1], "metrics", **FP32)
    assert_same(state(runs[0]), state(runs[1]), "state", **FP32)


class _RecordingCapturedStep(CapturedStep):
    """CapturedStep noting each eager warm-up and capture with the batch size it saw."""

    def __init__(self, step, warmup):
        super().__init__(step, warmup)
        self.events = []

    def _eager(self, inputs):
        self.events.append(("eager", inputs[0].shape[0]))
        return super()._eager(inputs)

    def _capture(self, inputs):
        self.events.append(("capture", inputs[0].shape[0]))
        return super()._capture(inputs)


@pytest.mark.cuda
def test_a_new_input_shape_is_warmed_up_then_captured(gpu):
    """A last partial batch (here 4 of 8) gets its own three eager steps and its own graph; the
    first shape's graph is replayed again afterwards; all as the eager run."""
    case = CASES["dml+adm"]
    precision = Precision(gpu, None, False)
    captured, eager = build(case, precision, cuda_graph=True), build(case, precision, cuda_graph=False)
    recorder = captured.step.captured = _RecordingCapturedStep(captured.step.eager, warmup=3)
    histories = []
    for run in (captured, eager):
        history = train(run, case, epochs=2)  # 6 steps of 8: 3 eager, capture, 2 replays
        history += train(run, case, epochs=2, batch=4)  # 6 steps of 4: 3 eager, capture, 2 replays
        history += train(run, case, epochs=1)  # 3 more steps of 8: replays of the first graph
        histories.append(history)
    torch.cuda.synchronize()
    assert recorder.events == [("eager", 8)] * 3 + [("capture", 8)] + [("eager", 4)] * 3 + [("capture", 4)]
    assert len(recorder.graphs) == 2 and sorted(recorder.warmups.values()) == [3, 3]
    assert_same(histories[0], histories[1], "metrics", **FP32)
    assert_same(state(captured), state(eager), "state", **FP32)


@pytest.mark.cuda
def test_a_resumed_cuda_run_continues_exactly(gpu, tiny):
    """Trainer on CUDA (bf16, channels_last, captured step): stopped by train.max_steps inside the
    second epoch and resumed (three eager warm-up steps, a new capture), it ends where an
    uninterrupted run ends, bit for bit (weights, buffers, optimizer state, the last evaluation).
    Two uninterrupted runs are compared first, so that a failure tells nondeterminism from a
    resume that lost something."""
    cuda = [o for o in tiny if not o.startswith("train.device")] + ["train.device=cuda"]

    def fit(*overrides):
        trainer = Trainer(load_config(overrides=cuda + list(overrides)), progress=False)
        return trainer, trainer.fit()

    full, summary_full = fit("train.run_name=full")
    again, _ = fit("train.run_name=again")
    assert full.step.use_cuda_graph and full.step.captured.graphs
    assert_same(state(full), state(again), "two uninterrupted CUDA runs (not deterministic)", **EXACT)

    k = full.steps_per_epoch + 1  # inside the second epoch, after the first run's capture
    _, summary = fit("train.run_name=part", f"train.max_steps={k}")
    assert summary["status"] == "max_steps" and summary["global_step"] == k
    resumed, summary = fit("train.run_name=part", "train.resume=auto")
    assert summary["status"] == "completed" and summary["global_step"] == summary_full["global_step"]
    assert resumed.step.captured.graphs  # the resumed run captured its own graph
    assert_same(state(full), state(resumed), "resumed vs uninterrupted", **EXACT)
    assert {key: v for key, v in summary["last"].items() if "/" in key} == \
        {key: v for key, v in summary_full["last"].items() if "/" in key}  # the last evaluation, timings aside
