"""Datasets: the procedurally generated embedded default dataset, FFCV .beton writers and the
loaders (FFCV-backed or device-resident) that read them; Cityscapes and the segmentation loader."""
from ._loading import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    LOADER_PIPELINES,
    ORDERS,
    RRC_RATIO,
    RRC_SCALE,
    BetonInfo,
    KDLoader,
    LoaderConfig,
    beton_info,
    epoch_order,
)
from .beton import (
    BETON_VERSION,
    WRITE_MODES,
    OutputExistsError,
    UnreadableImageError,
    atomic_beton,
    embedded_beton,
    read_cifar,
    scan_image_folder,
    write_cifar,
    write_embedded,
    write_image_folder,
)
from .cityscapes import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    LABEL_ID_TO_TRAIN_ID,
    scan_cityscapes,
    to_train_ids,
    write_cityscapes,
)
from .device_loader import DeviceLoader
from .embedded import CLASSES, VERSION, EmbeddedSpec, cache_dir, generate
from .loaders import FFCVLoader, make_loader, resident_budget, resident_bytes
from .segmentation import (
    SEG_PIPELINES,
    SegmentationConfig,
    SegmentationLoader,
    make_segmentation_loader,
    seg_train_transform,
)

__all__ = ["CITYSCAPES_CLASSES", "IGNORE_INDEX", "LABEL_ID_TO_TRAIN_ID", "SEG_PIPELINES", "SegmentationConfig",
           "SegmentationLoader", "make_segmentation_loader", "scan_cityscapes", "seg_train_transform", "to_train_ids",
           "write_cityscapes",
           "BETON_VERSION", "CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "LOADER_PIPELINES", "ORDERS",
           "RRC_RATIO",
           "RRC_SCALE", "VERSION", "WRITE_MODES", "BetonInfo", "DeviceLoader", "EmbeddedSpec", "FFCVLoader",
           "KDLoader", "LoaderConfig", "OutputExistsError", "UnreadableImageError", "atomic_beton", "beton_info",
           "cache_dir", "embedded_beton", "epoch_order", "generate", "make_loader", "read_cifar", "resident_budget",
           "resident_bytes", "scan_image_folder", "write_cifar", "write_embedded", "write_image_folder"]
