"""Typed records every reader returns, and the summary of what a reader could not use.

A reader never silently drops or invents data (issue 3, "Bad input"): each file it cannot use
becomes a :class:`ReadIssue` (file and reason) in the dataset's ``issues``; with ``strict`` the
first summary raises :class:`DataError` instead.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ctrlgen.data.errors import DataError
from ctrlgen.data.imageio import read_image, read_mask

Source = Literal["real", "procedural"]


@dataclass(frozen=True)
class ReadIssue:
    """One file (or folder) a reader could not use, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Record:
    """One sample of a dataset.

    ``label`` is the primary class (a diagnosis such as ``"nv"``), ``labels`` holds multi-label or
    one-hot targets (the 14 CheXpert observations: 1.0 positive, 0.0 negative, -1.0 uncertain,
    NaN not mentioned), ``text`` a report or caption, ``meta`` everything else the source gives.
    ``image_path`` is ``None`` when the dataset ships labels without images (Derm7pt, DDI,
    Fitzpatrick17k samples) or the image is not on disk.
    """

    id: str
    image_path: Path | None = None
    mask_path: Path | None = None
    label: str = ""
    labels: Mapping[str, float] = field(default_factory=dict)
    text: str = ""
    split: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def load_image(self, mode: str = "RGB") -> np.ndarray:
        """The image as a uint8 array (H, W, 3) for ``mode="RGB"`` or (H, W) for ``"L"``."""
        if self.image_path is None:
            raise DataError(f"record {self.id} has no image on disk")
        return read_image(self.image_path, mode)

    def load_mask(self) -> np.ndarray:
        """The lesion / object mask as a boolean array (H, W)."""
        if self.mask_path is None:
            raise DataError(f"record {self.id} has no mask")
        return read_mask(self.mask_path)

    def with_split(self, split: str) -> Record:
        return replace(self, split=split)


@dataclass
class Dataset:
    """Records of one dataset plus where they came from.

    ``source`` says whether the records are the real dataset found under ``root`` or a procedural
    world the product generated (the book prints it next to every number computed on it).
    """

    name: str
    root: Path
    records: list[Record]
    source: Source = "real"
    issues: list[ReadIssue] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    description: str = ""
    resolution: int = 0  # 0: original files; else the side of the resized square copies
    provenance: str = ""  # e.g. "real data at ..." or "procedural world 'derm' at ..."

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    @property
    def splits(self) -> dict[str, int]:
        """Number of records per split name."""
        return dict(Counter(r.split for r in self.records))

    def split(self, name: str) -> list[Record]:
        """Records of one split (``train``, ``val``, ``test``)."""
        return [r for r in self.records if r.split == name]

    def label_counts(self) -> dict[str, int]:
        """Records per primary label, in ``classes`` order when known."""
        counts = Counter(r.label for r in self.records if r.label)
        order = [c for c in self.classes if c in counts] + sorted(set(counts) - set(self.classes))
        return {c: counts[c] for c in order}

    def with_images(self) -> list[Record]:
        return [r for r in self.records if r.image_path is not None]

    def to_frame(self):
        """A pandas DataFrame, one row per record (meta and labels flattened into columns)."""
        rows = []
        for r in self.records:
            row = {"id": r.id, "split": r.split, "label": r.label, "text": r.text,
                   "image_path": str(r.image_path) if r.image_path else "",
                   "mask_path": str(r.mask_path) if r.mask_path else ""}
            row.update({f"labels.{k}": v for k, v in r.labels.items()})
            row.update({f"meta.{k}": v for k, v in r.meta.items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def load_arrays(self, records: Sequence[Record] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Stack images (N, H, W, 3) uint8 and masks (N, H, W) bool (None if no record has one).

        All images must share one size: resize first (``ctrlgen.data.resize_dataset``).
        """
        chosen = list(self.with_images() if records is None else records)
        images = np.stack([r.load_image() for r in chosen]) if chosen else np.zeros((0, 0, 0, 3), np.uint8)
        if chosen and all(r.mask_path is not None for r in chosen):
            return images, np.stack([r.load_mask() for r in chosen])
        return images, None

    def issue_summary(self, limit: int = 0) -> str:
        """A count per reason, then one line per unusable file (the first ``limit`` when > 0)."""
        if not self.issues:
            return ""
        reasons = Counter(i.reason.split(":")[0] for i in self.issues)
        head = f"{self.name}: {len(self.issues)} file(s) not used (" + ", ".join(f"{n} {r}" for r, n in reasons.items()) + ")"
        shown = self.issues[:limit] if limit > 0 else self.issues
        more = [f"  ... and {len(self.issues) - len(shown)} more (Dataset.issues lists all)"] if len(shown) < len(self.issues) else []
        return "\n".join([head, *(f"  {i}" for i in shown), *more])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, {len(self.records)} records, source={self.source!r}, "
                f"splits={self.splits}, issues={len(self.issues)}, root={str(self.root)!r})")
