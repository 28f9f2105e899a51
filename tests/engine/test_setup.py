"""The set-up training and evaluation share: device, process group, precision, models."""
import pytest
import torch

from kdengine.engine import distributed, load_config
from kdengine.engine.setup import Precision, build_models, device_and_processes, model_tags, resolve_device


def test_cpu_device_and_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    device, dist = device_and_processes("cpu")
    assert device == torch.device("cpu") and not dist.enabled and dist.is_main


def test_cuda_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="train.device=cuda"):
        resolve_device("cuda")


def _fake_torchrun(monkeypatch, events, local_rank):
    """torchrun's environment for rank ``local_rank`` of 2, a GPU as seen by torch, and a process
    group whose creation is recorded instead of run."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(("set_device", device)))

    def init_process_group(backend, **kwargs):
        events.append(("init_process_group", backend, kwargs.get("device_id")))

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: local_rank)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)


@pytest.mark.parametrize("name", ["cuda", "auto"], ids=["named", "auto"])  # (an id "cuda" would mark it GPU-only)
def test_nccl_starts_after_the_device_is_set_and_is_bound_to_it(monkeypatch, name):
    events = []
    _fake_torchrun(monkeypatch, events, local_rank=1)
    device, dist = device_and_processes(name)
    gpu = torch.device("cuda:1")
    assert device == gpu
    assert events == [("set_device", gpu), ("init_process_group", "nccl", gpu)]
    assert (dist.rank, dist.world_size, dist.local_rank, dist.initialized_here) == (1, 2, 1, True)


def test_gloo_on_the_cpu_takes_no_device(monkeypatch):
    events = []
    _fake_torchrun(monkeypatch, events, local_rank=0)
    device, dist = device_and_processes("cpu")
    assert device == torch.device("cpu") and dist.enabled
    assert events == [("init_process_group", "gloo", None)]


def test_precision_rule():
    cfg = load_config()
    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    p = Precision.of(cfg.train, cpu)
    assert (p.autocast_dtype, p.channels_last, p.input_dtype) == (None, False, torch.float32)
    assert p.memory_format == torch.contiguous_format
    p = Precision.of(cfg.train, gpu)
    assert (p.autocast_dtype, p.channels_last, p.input_dtype) == (torch.bfloat16, True, torch.bfloat16)
    cfg = load_config(overrides=["train.precision=bf16", "train.channels_last=true"])
    p = Precision.of(cfg.train, cpu)
    assert (p.autocast_dtype, p.memory_format) == (torch.bfloat16, torch.channels_last)
    with p.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    cfg = load_config(overrides=["train.precision=fp32"])
    with Precision.of(cfg.train, gpu).autocast():
        assert not torch.is_autocast_enabled("cuda")


def test_build_models_takes_given_weights_and_the_layout():
    cfg = load_config(overrides=["models.0.name=resnet8", "data.embedded.num_classes=4",
                                 "train.channels_last=true"])
    precision = Precision.of(cfg.train, torch.device("cpu"))
    first = build_models(cfg, precision)
    assert len(first) == 2 and first[0](torch.zeros(1, 3, 16, 16)).logits.shape == (1, 4)
    conv = next(p for p in first[0].parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    again = build_models(cfg, precision, weights=[m.state_dict() for m in first])
    for a, b in zip(first, again):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)


def test_model_tags_number_repeated_roles():
    cfg = load_config(overrides=["models=[{name: resnet8, role: student}, {name: resnet8, role: student}]"])
    assert model_tags(cfg) == ["student1", "student2"]
    assert model_tags(load_config()) == ["teacher", "student"]
