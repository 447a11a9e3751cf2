"""Labels → semi-structured prompt, and the reference image of a label (thesis §6.3.1).

A label is a mapping observation → value with CheXpert's values: 1.0 (positive), 0.0 (negative), -1.0
(uncertain) or blank (``None``/NaN: not mentioned). The prompt is "A chest X-Ray image with …, without …,
and unclear about …", the blanks filled with the observations marked 1.0, 0.0 and -1.0 (§6.3.1). The thesis
prints the pattern with all three clauses; an empty group is left out here (the book's choice: "without ,"
would be an empty clause), and the remaining clauses keep the thesis's connectives.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ctrlgen.data.readers.cxr import CHEXPERT_LABELS, NIH_LABELS

PREFIX = "A chest X-Ray image"
CLAUSES = ("with", "without", "unclear about")
VALUES = {1.0: "with", 0.0: "without", -1.0: "unclear about"}
SAME_LABELS, SAME_POSITIVES, NO_REFERENCE = "same labels", "same positives", "none"


def _is_blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def check_label(label: Mapping[str, object], where: str = "label") -> dict[str, float | None]:
    """The label with values as float or ``None`` (blank); anything outside {1, 0, −1, blank} raises one
    ``ValueError`` naming the observation, the value and ``where`` it came from."""
    out: dict[str, float | None] = {}
    for name, value in label.items():
        if _is_blank(value):
            out[name] = None
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = float("inf")
        if v not in VALUES:
            raise ValueError(f"{where}: observation {name!r} has value {value!r}; expected 1.0, 0.0, -1.0 or blank")
        out[name] = v
    return out


def _group(names: Sequence[str]) -> str:
    return ", ".join(n.lower().replace("_", " ") for n in names)


def label_prompt(label: Mapping[str, object]) -> str:
    """"A chest X-Ray image with X, without Y, and unclear about Z" (§6.3.1) from one label.

    One clause: "… with X"; two: "… with X and without Y"; three: "… with X, without Y, and unclear about Z";
    none (all blank): "A chest X-Ray image". Observations keep the label's order, lower case, "_" → " "."""
    lab = check_label(label)
    groups = {clause: [n for n, v in lab.items() if v is not None and VALUES[v] == clause] for clause in CLAUSES}
    parts = [f"{clause} {_group(names)}" for clause, names in groups.items() if names]
    if not parts:
        return PREFIX
    if len(parts) == 1:
        return f"{PREFIX} {parts[0]}"
    if len(parts) == 2:
        return f"{PREFIX} {parts[0]} and {parts[1]}"
    return f"{PREFIX} {parts[0]}, {parts[1]}, and {parts[2]}"


def prompt_vocabulary() -> list[str]:
    """Texts whose words a base model's tokenizer must hold as single tokens for every ``label_prompt``: each
    clause with every CheXpert and NIH observation (else "unclear" or "cardiomediastinum" split into pieces and
    the mini text encoder's 32 positions overflow)."""
    names = sorted({*CHEXPERT_LABELS, *NIH_LABELS})
    return [label_prompt({name: 1.0}) for name in names] + [label_prompt({names[0]: 1.0, names[1]: 0.0, names[2]: -1.0})]


def label_key(label: Mapping[str, object]) -> tuple:
    """The label's non-blank entries as a hashable key: two images have "the same label" when every observation
    has the same value, a blank (not mentioned) and an absent observation counting alike."""
    lab = check_label(label)
    return tuple(sorted((n, v) for n, v in lab.items() if v is not None))


def positives(label: Mapping[str, object]) -> frozenset[str]:
    """The observations marked 1.0."""
    return frozenset(n for n, v in check_label(label).items() if v == 1.0)


@dataclass(frozen=True)
class Reference:
    """The reference image chosen for a label: its index in the pool (None when there is none) and the branch."""

    index: int | None
    branch: str           # SAME_LABELS | SAME_POSITIVES | NO_REFERENCE


class ReferencePool:
    """Reference image selection (§6.3.1): an image of the training pool with the same label; if there is none,
    one with the same positive observations (1.0) whatever its other values; else no reference.

    ``exclude`` keeps an image from being its own reference (the book's choice against leakage: a training
    image conditioned on itself would teach the model to copy the reference). Among several candidates one is
    drawn with ``numpy.random.default_rng(seed)`` — the same call gives the same reference."""

    def __init__(self, labels: Sequence[Mapping[str, object]]):
        self.keys = [label_key(l) for l in labels]
        self.pos = [positives(l) for l in labels]
        self.by_key: dict[tuple, list[int]] = {}
        self.by_pos: dict[frozenset, list[int]] = {}
        for i, (k, p) in enumerate(zip(self.keys, self.pos)):
            self.by_key.setdefault(k, []).append(i)
            self.by_pos.setdefault(p, []).append(i)

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, label: Mapping[str, object], seed: int = 0, exclude: int | None = None) -> Reference:
        rng = np.random.default_rng(seed)
        for branch, candidates in ((SAME_LABELS, self.by_key.get(label_key(label), [])),
                                   (SAME_POSITIVES, self.by_pos.get(positives(label), []))):
            candidates = [i for i in candidates if i != exclude]
            if candidates:
                return Reference(int(candidates[int(rng.integers(len(candidates)))]), branch)
        return Reference(None, NO_REFERENCE)

    def select_many(self, labels: Sequence[Mapping[str, object]], seed: int = 0,
                    exclude_self: bool = False) -> list[Reference]:
        """One reference per label (seed + position); ``exclude_self``: label i is pool image i (training)."""
        return [self.select(l, seed + i, i if exclude_self else None) for i, l in enumerate(labels)]


def branch_counts(refs: Sequence[Reference]) -> dict[str, int]:
    """How many labels took each branch of the selection."""
    return {b: sum(r.branch == b for r in refs) for b in (SAME_LABELS, SAME_POSITIVES, NO_REFERENCE)}


__all__ = ["PREFIX", "CLAUSES", "SAME_LABELS", "SAME_POSITIVES", "NO_REFERENCE", "check_label", "label_prompt", "prompt_vocabulary",
           "label_key", "positives", "Reference", "ReferencePool", "branch_counts"]
