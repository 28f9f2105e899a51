"""Figures of runs: accuracy and loss curves."""
from .curves import plot_curves, plot_run

__all__ = ["plot_curves", "plot_run"]
