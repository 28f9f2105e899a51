"""kdengine: high-performance knowledge distillation for PyTorch."""
from . import losses, ops  # ops loads the compiled extension (kdengine._extension)
from ._version import __version__

__all__ = ["__version__", "ops", "losses"]
