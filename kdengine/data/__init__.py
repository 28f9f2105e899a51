"""Datasets: the procedurally generated embedded default dataset and FFCV .beton writers."""
from .beton import atomic_beton, embedded_beton, write_embedded
from .embedded import CLASSES, VERSION, EmbeddedSpec, cache_dir, generate

__all__ = ["CLASSES", "VERSION", "EmbeddedSpec", "atomic_beton", "cache_dir", "embedded_beton",
           "generate", "write_embedded"]
