"""What every kdengine figure shares: matplotlib without a display, and PNGs written atomically."""
from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: os.PathLike | str, dpi: int = 110) -> Path:
    """Write ``fig`` to the PNG ``path`` through a temporary file (a reader never sees half a
    file) and close it.

    Args:
        fig: a matplotlib figure.
        path: the PNG to write; its folder is created.
        dpi: resolution.

    Returns:
        ``path`` as a ``Path``.
    """
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path
