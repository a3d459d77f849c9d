"""selfclassifier: auto-group an unlabeled image folder with Self-Classifier, curate, export.

The public Python API (heavy modules are imported on first use)::

    import selfclassifier_core as sc
    report = sc.scan("photos/")                       # catalog the folder
    grouped = sc.group("photos/")                     # or: the one-step default grouping
    result = sc.train("photos/", classes=10, minutes=5)  # learn classes, predict
    sc.export_csv(result.workspace, "labels.csv")     # labels as CSV
    sc.review_queue(sc.Labels(result.workspace), 20)  # the images worth checking next
    sc.refit(result.workspace)                        # learn from your names and fixes
    sc.search_text(result.workspace, "red sneakers")  # a fast CLIP run: images nearest a text
    sc.suggest_names(result.workspace)                # ... and names for its clusters
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "Workspace": ("store.workspace", "Workspace"),
    "WorkspaceError": ("store.workspace", "WorkspaceError"),
    "scan": ("catalog.scanner", "scan"),
    "ScanReport": ("catalog.scanner", "ScanReport"),
    "catalog_summary": ("catalog.summary", "catalog_summary"),
    "CatalogSummary": ("catalog.summary", "CatalogSummary"),
    "load_rgb": ("catalog.imageio", "load_rgb"),
    "probe": ("catalog.imageio", "probe"),
    "ImageLoadError": ("catalog.imageio", "ImageLoadError"),
    "train": ("workflows.pipeline", "train"),
    "group": ("workflows.group", "group"),
    "refit": ("workflows.refit", "refit"),
    "RefitResult": ("workflows.refit", "RefitResult"),
    "review_queue": ("curation.review", "review_queue"),
    "read_feedback": ("curation.feedback", "read_feedback"),
    "GroupResult": ("workflows.group", "GroupResult"),
    "predict": ("inference.predict", "predict"),
    "load_predictions": ("store.predictions", "load_predictions"),
    "export_csv": ("curation.export", "export_csv"),
    "export_imagefolder": ("curation.export", "export_imagefolder"),
    "export_parquet": ("curation.export", "export_parquet"),
    "export_jsonl": ("curation.export", "export_jsonl"),
    "build_csv_bytes": ("curation.export", "build_csv_bytes"),
    "ExportReport": ("curation.export", "ExportReport"),
    "carry_over": ("curation.labels", "carry_over"),
    "CarryOverReport": ("curation.labels", "CarryOverReport"),
    "Labels": ("curation.labels", "Labels"),
    "NeighborIndex": ("curation.neighbors", "NeighborIndex"),
    "search_text": ("inference.text", "search_text"),
    "suggest_names": ("curation.names", "suggest_names"),
    "apply_names": ("curation.names", "apply_names"),
    "run_summary": ("curation.summary", "run_summary"),
    "format_summary": ("curation.summary", "format_summary"),
    "RunSummary": ("curation.summary", "RunSummary"),
    "HeadSummary": ("curation.summary", "HeadSummary"),
    "umap_2d": ("curation.projection", "umap_2d"),
    "run_map": ("curation.projection", "run_map"),
    "thumbnail": ("catalog.thumbnails", "thumbnail"),
    "thumbnail_bytes": ("catalog.thumbnails", "thumbnail_bytes"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'selfclassifier_core' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
