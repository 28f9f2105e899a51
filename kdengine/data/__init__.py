"""Datasets: the procedurally generated embedded default dataset, FFCV .beton writers and the
loaders (FFCV-backed or device-resident) that read them."""
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
from ._loading import KDLoader, LoaderConfig
from .device_loader import DeviceLoader
from .loaders import FFCVLoader, PIPELINES, make_loader, resident_budget, resident_bytes
from .embedded import CLASSES, VERSION, EmbeddedSpec, cache_dir, generate

__all__ = ["BETON_VERSION", "CLASSES", "PIPELINES", "VERSION", "DeviceLoader", "EmbeddedSpec", "FFCVLoader",
           "KDLoader", "LoaderConfig", "atomic_beton", "cache_dir", "embedded_beton", "generate",
           "make_loader", "read_cifar", "resident_budget", "resident_bytes", "scan_image_folder",
           "write_cifar", "write_embedded", "write_image_folder"]
