"""``ctrlgen data check``: every dataset found / partial / missing, with counts and where to get it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ctrlgen.data.datasets import dataset_folder, read_options
from ctrlgen.data.imageio import image_size
from ctrlgen.data.readers.cxr import read_chexpert_labels
from ctrlgen.data.records import DataError
from ctrlgen.data.registry import SPECS, DatasetSpec


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str          # found | partial | missing
    folder: Path
    records: int = 0
    images: int = 0
    masks: int = 0
    issues: int = 0
    resolution: str = ""
    detail: str = ""


def check_dataset(s: DatasetSpec, cfg: Mapping[str, Any]) -> CheckResult:
    """Read one dataset with header-only verification and classify it."""
    folder = dataset_folder(s.name, cfg)
    if s.labels_only:
        try:
            rows = len(read_chexpert_labels(folder))
            return CheckResult(s.name, "found", folder, records=rows, detail="label table")
        except DataError as err:
            return CheckResult(s.name, "missing", folder, detail=str(err))
    options = replace(read_options(cfg), verify="header", max_samples=0, strict=False)
    try:
        from ctrlgen.paths import data_root

        ds = s.read(folder, options, data_root(cfg))
    except DataError as err:
        return CheckResult(s.name, "missing", folder, detail=str(err).split(";")[0])
    images = [r for r in ds.records if r.image_path is not None]
    masks = sum(r.mask_path is not None for r in ds.records)
    sizes = sorted({image_size(r.image_path) for r in images[:20]})
    resolution = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    complete = ds.records and len(images) == len(ds.records) and not ds.issues
    return CheckResult(s.name, "found" if complete else "partial", folder, len(ds.records), len(images), masks,
                       len(ds.issues), resolution,
                       "" if complete else f"{len(ds.records) - len(images)} records without image, {len(ds.issues)} issue(s)")


def check_all(cfg: Mapping[str, Any]) -> list[CheckResult]:
    return [check_dataset(s, cfg) for s in SPECS.values()]


def format_report(results: list[CheckResult]) -> str:
    """The table ``ctrlgen data check`` prints, then for every missing/partial dataset how to complete it."""
    lines = [f"{'dataset':24} {'status':8} {'records':>8} {'images':>7} {'masks':>6} {'issues':>6}  resolution"]
    for r in results:
        lines.append(f"{r.name:24} {r.status:8} {r.records:8d} {r.images:7d} {r.masks:6d} {r.issues:6d}  {r.resolution}")
    for r in results:
        if r.status != "found":
            s = SPECS[r.name]
            world = f" Until then chapters use the procedural world '{s.world}'." if s.world else ""
            lines += ["", f"{r.name} ({s.title}) is {r.status}: {r.detail}",
                      f"  get it from: {s.obtain}", f"  licence: {s.licence}",
                      f"  put it at:   {r.folder}  ({s.expect}){world}"]
    return "\n".join(lines)
