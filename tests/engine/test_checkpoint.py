"""Atomic checkpoints and pretrained-weight loading."""
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


def test_load_pretrained_accepts_plain_and_kdengine_checkpoints(tmp_path):
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    plain = tmp_path / "plain.pt"
    torch.save(src.state_dict(), plain)
    ckpt.load_pretrained(dst, str(plain), None, default_index=0)
    assert torch.equal(dst.weight, src.weight)
    other = torch.nn.Linear(3, 2)
    run = tmp_path / "run.pt"
    torch.save({"config": {}, "models": [other.state_dict(), src.state_dict()]}, run)
    ckpt.load_pretrained(dst, str(run), 0, default_index=1)
    assert torch.equal(dst.weight, other.weight)
    ckpt.load_pretrained(dst, str(run), None, default_index=1)
    assert torch.equal(dst.weight, src.weight)
    with pytest.raises(ValueError, match="out of range"):
        ckpt.load_pretrained(dst, str(run), 5, default_index=0)
    with pytest.raises(ValueError, match="do not fit Linear"):
        ckpt.load_pretrained(torch.nn.Linear(4, 2), str(plain), None, default_index=0)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
