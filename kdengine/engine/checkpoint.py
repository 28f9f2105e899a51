"""Atomic checkpoints: a file at the checkpoint path is always complete.

A checkpoint holds everything a run needs to continue exactly: models, the method's own
parameters and buffers, optimizer and scheduler states, RNG states, the position (epoch and the
step within it), the metrics history and the resolved configuration.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.serialization import default_restore_location

LAST = "checkpoint.pt"


def save_atomic(obj: Any, path: os.PathLike | str) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over it: an
    interruption leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: os.PathLike | str, map_location="cpu") -> dict:
    """A checkpoint's contents.

    Args:
        path: the checkpoint file.
        map_location: where tensors saved on an accelerator go (a device or its name). Tensors
            saved on the CPU stay there whatever it is: the RNG states (CUDA's included), which
            ``set_rng_state`` needs as CPU ByteTensors, and the metric sums.

    Returns:
        The saved object.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read (truncated, not a ``torch.save`` file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    target = str(torch.device(map_location))

    def locate(storage, location: str):
        return storage if location == "cpu" else default_restore_location(storage, target)

    try:
        return torch.load(path, map_location=locate, weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"checkpoint {path} could not be read: {exc}") from exc


def position(path: os.PathLike | str) -> dict:
    """Where the run that saved ``path`` stands, without reading its tensors (the file is
    memory-mapped): what choosing a run to continue needs.

    Args:
        path: a checkpoint written by the trainer.

    Returns:
        ``{"epoch", "step_in_epoch", "global_step", "epochs", "config"}``: the epochs completed,
        the steps done in the next one, the steps in all, the run's ``train.epochs`` and its
        configuration (a plain dict).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable kdengine training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        config = state["config"]
        return {"epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"],
                "global_step": state["global_step"], "epochs": config["train"]["epochs"], "config": config}
    except Exception as exc:  # truncated, foreign, or not a training checkpoint
        raise ValueError(f"checkpoint {path} could not be read as a kdengine training checkpoint: {exc}") from exc


def epoch_checkpoint_name(epochs_done: int) -> str:
    """The file name of the checkpoint kept after ``epochs_done`` epochs (``train.keep_checkpoints``)."""
    if epochs_done < 1:
        raise ValueError(f"epochs_done must be >= 1, got {epochs_done}")
    return f"checkpoint-epoch{epochs_done:03d}.pt"


def epoch_checkpoints(run_dir: os.PathLike | str) -> list[tuple[int, Path]]:
    """The per-epoch checkpoints of a run, ``[(epochs_done, path)]`` in epoch order."""
    found = []
    for path in Path(run_dir).glob("checkpoint-epoch*.pt"):
        match = re.fullmatch(r"checkpoint-epoch(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_last(run_dir: os.PathLike | str) -> Optional[Path]:
    path = Path(run_dir) / LAST
    return path if path.is_file() else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state_dict(checkpoint: dict, index: int) -> dict:
    """Model ``index``'s weights from a kdengine checkpoint."""
    models = checkpoint["models"]
    if not 0 <= index < len(models):
        raise ValueError(f"the checkpoint holds {len(models)} models; index {index} is out of range")
    return models[index]
