"""Datasets: the procedurally generated embedded default dataset and FFCV .beton writers."""
from .beton import (
    BETON_VERSION,
    atomic_beton,
    embedded_beton,
    read_cifar,
    scan_image_folder,
    write_cifar,
    write_embedded,
    write_image_folder,
)
from .embedded import CLASSES, VERSION, EmbeddedSpec, cache_dir, generate

__all__ = ["BETON_VERSION", "CLASSES", "VERSION", "EmbeddedSpec", "atomic_beton", "cache_dir", "embedded_beton",
           "generate", "read_cifar", "scan_image_folder", "write_cifar", "write_embedded",
           "write_image_folder"]
