"""The training engine: configuration, the joint M-model step, checkpoints and metrics."""
from .config import ConfigError, ExperimentConfig, load_config
from .trainer import NonFiniteLossError, Trainer

__all__ = ["ConfigError", "ExperimentConfig", "NonFiniteLossError", "Trainer", "load_config"]
