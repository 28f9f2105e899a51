"""Atomic checkpoints, and RNG states that survive loading onto a device."""
import random

import numpy as np
import pytest
import torch

from kdengine.engine import checkpoint as ckpt


def test_save_is_atomic_when_serialisation_fails(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt.save_atomic({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(ckpt.load(path)["a"], torch.ones(2))  # the old checkpoint survives
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]  # no temporary left


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ckpt.load(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt could not be read"):
        ckpt.load(junk)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_rng_states_load_on_the_cpu_whatever_the_device(tmp_path, monkeypatch):
    """A CUDA run's checkpoint holds CPU ByteTensors for every GPU's RNG; loading it onto the run's
    device must leave them on the CPU, where torch.cuda.set_rng_state_all wants them. "meta" stands
    for the device here: it is where map_location sends tensors without needing a GPU."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "cuda": [torch.get_rng_state().clone(), torch.get_rng_state().clone()]}  # as get_rng_state_all gives
    path = ckpt.save_atomic({"rng": rng}, tmp_path / "checkpoint.pt")
    state = ckpt.load(path, map_location="meta")
    for tensor in [state["rng"]["torch"], *state["rng"]["cuda"]]:
        assert tensor.device.type == "cpu" and tensor.dtype == torch.uint8
    assert torch.equal(state["rng"]["cuda"][1], rng["cuda"][1])

    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", got.append)
    ckpt.set_rng_state(state["rng"])
    assert len(got) == 1 and all(s.device.type == "cpu" and s.dtype == torch.uint8 for s in got[0])
