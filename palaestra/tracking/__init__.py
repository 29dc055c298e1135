"""Experiment tracking: an MLflow run per training run (its artifacts local or in S3), plus PNG training curves."""

from palaestra.tracking.buffered import BufferedTracker
from palaestra.tracking.mlflow_tracker import (
    MlflowTracker,
    TrackingError,
    default_tracking_uri,
    flatten_config,
)
from palaestra.tracking.plots import plot_curves

__all__ = [
    "BufferedTracker",
    "MlflowTracker",
    "TrackingError",
    "default_tracking_uri",
    "flatten_config",
    "plot_curves",
]
