"""selfclassifier: auto-group an unlabeled image folder with Self-Classifier, curate, export.

The public Python API (heavy modules are imported on first use)::

    import selfclassifier_core as sc
    report = sc.scan("photos/")                       # catalog the folder
    result = sc.train("photos/", classes=10, minutes=5)  # learn classes, predict
    sc.export_csv(result.workspace, "labels.csv")     # labels as CSV
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "Workspace": ("workspace", "Workspace"),
    "WorkspaceError": ("workspace", "WorkspaceError"),
    "scan": ("catalog", "scan"),
    "ScanReport": ("catalog", "ScanReport"),
    "load_rgb": ("imageio", "load_rgb"),
    "probe": ("imageio", "probe"),
    "ImageLoadError": ("imageio", "ImageLoadError"),
    "train": ("trainer", "train"),
    "predict": ("predict", "predict"),
    "load_predictions": ("predictions", "load_predictions"),
    "export_csv": ("export", "export_csv"),
    "export_imagefolder": ("export", "export_imagefolder"),
    "export_parquet": ("export", "export_parquet"),
    "export_jsonl": ("export", "export_jsonl"),
    "build_csv_bytes": ("export", "build_csv_bytes"),
    "ExportReport": ("export", "ExportReport"),
    "carry_over": ("labels", "carry_over"),
    "CarryOverReport": ("labels", "CarryOverReport"),
    "Labels": ("labels", "Labels"),
    "NeighborIndex": ("neighbors", "NeighborIndex"),
    "umap_2d": ("projection", "umap_2d"),
    "run_map": ("projection", "run_map"),
    "thumbnail": ("thumbnails", "thumbnail"),
    "thumbnail_bytes": ("thumbnails", "thumbnail_bytes"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'selfclassifier_core' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
