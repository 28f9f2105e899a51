"""The training engine: configuration, the joint M-model step, checkpoints and metrics."""
from .config import ConfigError, ExperimentConfig, load_config
from .trainer import NonFiniteLossError, RunStatus, Trainer

__all__ = ["ConfigError", "ExperimentConfig", "NonFiniteLossError", "RunStatus", "Trainer", "load_config"]
