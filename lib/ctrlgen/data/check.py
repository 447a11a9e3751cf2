"""``ctrlgen data check``: every dataset found / partial / missing, with counts, every unusable file with
its reason, and where to get what is missing.

By default every image and mask is decoded in full (a truncated JPEG passes a header read and fails
later inside a chapter); each file's verdict is cached by (size, mtime) under
``<cache>/data/verified/`` — the same cache ``load_dataset`` uses — so a second check only stats files.
``verify="header"`` reads headers only (quick, misses truncated bodies).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ctrlgen.data.datasets import dataset_folder, read_options, verify_cache_path
from ctrlgen.data.imageio import ImageReadError, image_size
from ctrlgen.data.readers.cxr import read_chexpert_labels
from ctrlgen.data.records import DataError, ReadIssue
from ctrlgen.data.registry import SPECS, DatasetSpec
from ctrlgen.paths import data_root


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
    bad: tuple[ReadIssue, ...] = ()   # every file not used, with its reason


def check_dataset(s: DatasetSpec, cfg: Mapping[str, Any], verify: str = "full") -> CheckResult:
    """Read one dataset, decoding every file (``verify="full"``, cached) or headers only, and classify it."""
    folder = dataset_folder(s.name, cfg)
    if s.labels_only:
        try:
            rows = len(read_chexpert_labels(folder))
            return CheckResult(s.name, "found", folder, records=rows, detail="label table")
        except DataError as err:
            return CheckResult(s.name, "missing", folder, detail=str(err))
    options = replace(read_options(cfg, verify_cache_path(s.name, cfg)), verify=verify, max_samples=0, strict=False)
    try:
        ds = s.read(folder, options, data_root(cfg))
    except DataError as err:
        return CheckResult(s.name, "missing", folder, detail=str(err).split(";")[0])
    images = [r for r in ds.records if r.image_path is not None]
    masks = sum(r.mask_path is not None for r in ds.records)
    sizes = sorted({_size(r.image_path) for r in images[:20]} - {None})
    resolution = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
    complete = ds.records and len(images) == len(ds.records) and not ds.issues
    return CheckResult(s.name, "found" if complete else "partial", folder, len(ds.records), len(images), masks,
                       len(ds.issues), resolution,
                       "" if complete else f"{len(ds.records) - len(images)} records without image, {len(ds.issues)} issue(s)",
                       tuple(ds.issues))


def _size(path) -> tuple[int, int] | None:
    try:
        return image_size(path)
    except ImageReadError:  # already listed among the issues under verify="full"
        return None


def check_all(cfg: Mapping[str, Any], verify: str = "full") -> list[CheckResult]:
    """``check_dataset`` for every dataset of the registry."""
    return [check_dataset(s, cfg, verify) for s in SPECS.values()]


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
    for r in results:
        if r.bad:
            lines += ["", f"{r.name}: {len(r.bad)} file(s) not used:"] + [f"  {issue}" for issue in r.bad]
    return "\n".join(lines)
