"""What every reader shares: options, image/mask pairing with defect reports, sub-sampling."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrlgen.data.imageio import ImageReadError, check_image, image_size, write_json
from ctrlgen.data.records import DataError, Dataset, ReadIssue, Record
from ctrlgen.data.splits import assign_splits, split_counts

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
VERIFY_MODES = ("full", "header", "none")


@dataclass(frozen=True)
class ReadOptions:
    """How a reader splits, sub-samples and checks files (profile section ``data``).

    ``verify``: ``full`` decodes every image and mask (finds truncated files and empty masks; results
    cached per file under ``verify_cache``), ``header`` reads sizes only, ``none`` trusts the files.
    ``max_samples`` > 0 keeps that many records, spread over the splits in proportion.
    """

    seed: int = 0
    split_fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
    max_samples: int = 0
    verify: str = "full"
    strict: bool = False
    verify_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {self.verify!r}")


def list_files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Files of ``folder`` (not recursive) whose suffix is in ``suffixes``: stem -> path."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes
            and not p.name.startswith(".")}


def first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


class _VerifyCache:
    """Per-file results of full verification, keyed by path, size and mtime (JSON, atomic)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, Any] = {}
        self.dirty = False
        if path and path.is_file():
            try:
                self.data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.data = {}

    def check(self, file: Path, is_mask: bool) -> tuple[str, tuple[int, int]]:
        try:
            st = file.stat()
        except OSError as err:
            return f"unreadable file: {err}", (0, 0)
        key = f"{file}|{int(is_mask)}"
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.data.get(key)
        if hit and hit[0] == stamp:
            return hit[1], tuple(hit[2])
        reason, size = check_image(file, is_mask)
        self.data[key] = [stamp, reason, list(size)]
        self.dirty = True
        return reason, size

    def save(self) -> None:
        if self.path and self.dirty:
            write_json(self.path, self.data)


def verify_files(pairs: Iterable[tuple[str, Path | None, Path | None]], options: ReadOptions,
                 issues: list[ReadIssue]) -> set[str]:
    """Check image/mask files of each (id, image, mask); return the ids whose files are usable.

    Defects become issues: unreadable or truncated files, empty masks, and a mask whose size
    differs from its image's.
    """
    cache = _VerifyCache(options.verify_cache) if options.verify == "full" else None
    good: set[str] = set()
    for key, image, mask in pairs:
        sizes: list[tuple[int, int]] = []
        ok = True
        for file, is_mask in ((image, False), (mask, True)):
            if file is None:
                continue
            if options.verify == "none":
                continue
            if cache is not None:
                reason, size = cache.check(file, is_mask)
            else:
                try:
                    reason, size = "", image_size(file)
                except ImageReadError as err:
                    reason, size = err.reason, (0, 0)
            if reason:
                issues.append(ReadIssue(str(file), reason))
                ok = False
            sizes.append(size)
        if ok and len(sizes) == 2 and sizes[0] != sizes[1]:
            issues.append(ReadIssue(str(mask), f"size mismatch: mask {sizes[1][0]}x{sizes[1][1]} differs from image "
                                                f"{sizes[0][0]}x{sizes[0][1]} ({image.name})"))
            ok = False
        if ok:
            good.add(key)
    if cache is not None:
        cache.save()
    return good


def pair_by_id(images: Mapping[str, Path], masks: Mapping[str, Path], issues: list[ReadIssue],
               require_mask: bool = True) -> list[tuple[str, Path | None, Path | None]]:
    """Join images and masks by id; an unmatched file becomes an issue (never a silent drop)."""
    pairs = []
    for key in sorted(set(images) | set(masks)):
        image, mask = images.get(key), masks.get(key)
        if image is None:
            issues.append(ReadIssue(str(mask), "mask without image"))
            continue
        if mask is None and require_mask:
            issues.append(ReadIssue(str(image), "image without mask"))
            continue
        pairs.append((key, image, mask))
    return pairs


def apply_splits(records: list[Record], options: ReadOptions, group_key: str = "") -> list[Record]:
    """Give records without an official split a seeded one (grouped by ``meta[group_key]``)."""
    todo = [r for r in records if not r.split]
    if not todo:
        return records
    keys = [str(r.meta.get(group_key, r.id)) if group_key else r.id for r in todo]
    mapping = assign_splits(keys, options.split_fractions, options.seed)
    return [r if r.split else r.with_split(mapping[str(r.meta.get(group_key, r.id)) if group_key else r.id])
            for r in records]


def limit(records: list[Record], max_samples: int) -> list[Record]:
    """Keep ``max_samples`` records (all when 0), spread over the splits in proportion, by id order."""
    if max_samples <= 0 or len(records) <= max_samples:
        return records
    by_split: dict[str, list[Record]] = {}
    for r in sorted(records, key=lambda r: r.id):
        by_split.setdefault(r.split, []).append(r)
    names = sorted(by_split)
    counts = split_counts(max_samples, [len(by_split[n]) for n in names])
    # every split keeps at least one record when the budget allows it
    for i, name in enumerate(names):
        if counts[i] == 0 and max_samples >= len(names):
            j = max(range(len(counts)), key=counts.__getitem__)
            counts[j] -= 1
            counts[i] = 1
    return [r for n, c in zip(names, counts) for r in by_split[n][:c]]


def finish(dataset: Dataset, options: ReadOptions) -> Dataset:
    """Apply ``strict``: a dataset with any issue raises DataError listing every file and reason."""
    if options.strict and dataset.issues:
        raise DataError(f"strict mode: {dataset.issue_summary()}")
    return dataset


def missing(name: str, where: Path, what: str) -> DataError:
    return DataError(f"{name}: not found at {where} (expected {what}); run `ctrlgen data check` for where to get it")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


@dataclass
class Counts:
    """What ``ctrlgen data check`` reports for one dataset."""

    records: int = 0
    images: int = 0
    masks: int = 0
    labels: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
