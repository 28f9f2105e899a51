"""kdengine: high-performance knowledge distillation for PyTorch."""
from ._version import __version__
from . import _extension, ops, losses

__all__ = ["__version__", "ops", "losses"]
