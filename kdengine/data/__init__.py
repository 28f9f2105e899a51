"""Datasets: the procedurally generated embedded default dataset."""
from .embedded import CLASSES, VERSION, EmbeddedSpec, cache_dir, generate

__all__ = ["CLASSES", "VERSION", "EmbeddedSpec", "cache_dir", "generate"]
