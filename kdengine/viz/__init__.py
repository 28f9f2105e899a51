"""Figures and analyses of runs.

This package's top level holds what needs only torch and matplotlib (the engine imports from it):
curves, calibration (ECE, reliability diagrams) and the foreground-IoU measures. What loads
checkpoints is imported by module: :mod:`.analysis` (`kdengine viz RUN_DIR`: curves, maps, IoU over
the epochs, calibration), :mod:`.maps`, :mod:`.runs`, :mod:`.bands` (several runs, seeds as bands)
and :mod:`.report` (`kdengine viz report`).
"""
from .calibration import ECE_BINS, calibration_bins, ece_from_bins, expected_calibration_error, reliability
from .curves import plot_curves, plot_run
from .regions import CAM_THRESHOLD, cam_region, iou, mean_iou, similarity_regions

__all__ = ["CAM_THRESHOLD", "ECE_BINS", "calibration_bins", "cam_region", "ece_from_bins", "expected_calibration_error",
           "iou", "mean_iou", "plot_curves", "plot_run", "reliability", "similarity_regions"]
