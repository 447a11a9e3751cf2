"""The claims ledger: each directional claim of the thesis, the measurement a chapter records for it, and a
verdict computed by fixed rules (issue 13).

The ledger (``claims.yaml``) holds facts about the thesis: the claim as the thesis words it (exceptions
included), where it is made (section, table or figure), verbatim quotes, the thesis's table cells, which
arm the claim favours and in which direction, and what kind of measurement can test it. A chapter records
the measurement with one call per claim::

    record_claim(run, "ch4.region_aware_alignment", a=iou_mine, b=iou_noregion, seeds=1)

which stores the per-unit values in the chapter's result record (``metrics["claims"][claim_id]``). The book's
back-matter page reads every record and calls :func:`ledger_table`; nobody writes a verdict by hand.

Verdict rules (:func:`evaluate`), with α = 0.05 split over the k arms a claim compares against (Bonferroni,
α/k per arm), the effect signed so that a positive value is the direction the thesis claims:

* **not run** — no result record holds a measurement for the claim (the reason names the chapter).
* exact counts (``measure: count``) — reproduced when the direction holds (and the ratio bound the claim
  states, if any), not reproduced when it is reversed or the bound fails, inconclusive on a tie.
* fewer than two units per arm (e.g. one training seed for a per-seed claim) — **inconclusive**: no interval
  can be computed; the reason gives the observed direction.
* otherwise a percentile bootstrap interval of the mean difference (``scipy.stats.bootstrap``, 9 999
  resamples, seeded) at level 1 − α/k and a two-sided test (paired per-sample: Wilcoxon signed-rank;
  unpaired per-sample: Mann–Whitney U; per-seed: paired or Welch t-test):
  **reproduced** when the interval lies above 0 and p < α/k for every arm; **not reproduced** when for
  some arm it lies below 0 with p < α/k; **inconclusive** otherwise.
* a claim about trained models measured on one training seed keeps its verdict but says so: its interval
  covers the variation of test samples, not of training.
"""
from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from ctrlgen import paths
from ctrlgen.thesis import load_table

ALPHA = 0.05
N_RESAMPLES = 9999
RECORD_TABLE = "claims"
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run")
MEASURES = {
    "paired": "per-sample, paired (same seed and condition in both arms)",
    "unpaired": "per-sample, unpaired (independent samples)",
    "per-seed": "one value per training seed (or per independently generated set)",
    "count": "an exact count or cost (no sampling variation)",
}


# ---------------------------------------------------------------- the ledger (facts about the thesis)
@dataclass(frozen=True)
class Cell:
    """One number the thesis prints in a table: ``label`` shown on the page, resolved via ``load_table``."""

    label: str
    table: str
    row: str
    column: str

    def value(self) -> Any:
        """The cell's value in the transcribed table; KeyError naming the table, row and column when absent."""
        frame = load_table(self.table).frame()
        row = _label(frame.index, self.row)
        column = _label(frame.columns, self.column)
        try:
            return frame.loc[row, column]
        except KeyError:
            raise KeyError(f"Table {self.table} has no cell row={self.row!r} column={self.column!r}") from None


def _label(index: Any, text: str) -> Any:
    """A table label written as ``"a / b"`` for a MultiIndex level tuple, plain text otherwise."""
    return tuple(part.strip() for part in text.split(" / ")) if getattr(index, "nlevels", 1) > 1 else text


@dataclass(frozen=True)
class Claim:
    """One directional claim of the thesis and how this book can test it.

    ``a`` is the arm the claim favours, ``b`` the arms it is compared with; ``direction`` says whether the
    claim is that ``a`` is higher or lower on ``metric``. ``registered_by`` is the chapter (or chapter-name
    prefix) whose run records the measurement."""

    id: str
    chapter: int
    section: str
    ref: str
    claim: str
    quotes: tuple[str, ...]
    metric: str
    direction: str
    a: str
    b: tuple[str, ...]
    measure: str
    training: bool
    registered_by: str
    relative: bool = False
    scope: str = ""
    max_ratio: float | None = None
    cells: tuple[Cell, ...] = ()

    @property
    def paired(self) -> bool:
        """Whether the design pairs the arms (per-sample paired; per-seed claims pair by training seed)."""
        return self.measure in ("paired", "per-seed")

    def registers(self, chapter: str) -> bool:
        """Whether a record of ``chapter`` is where this claim's measurement belongs (exact name or prefix_)."""
        return chapter == self.registered_by or chapter.startswith(self.registered_by + "_")


_REQUIRED = ("id", "chapter", "section", "ref", "claim", "quotes", "metric", "direction", "a", "b", "measure",
             "training", "registered_by")


def _parse(entry: Mapping[str, Any], where: str) -> Claim:
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise ValueError(f"{where}: claim {entry.get('id', '?')!r} lacks {', '.join(missing)}")
    if entry["direction"] not in ("higher", "lower"):
        raise ValueError(f"{where}: claim {entry['id']!r} direction {entry['direction']!r}, expected higher or lower")
    if entry["measure"] not in MEASURES:
        raise ValueError(f"{where}: claim {entry['id']!r} measure {entry['measure']!r}, expected one of {', '.join(MEASURES)}")
    b = entry["b"]
    cells = tuple(Cell(str(c[0]), str(c[1]), str(c[2]), str(c[3])) for c in entry.get("cells", []) or [])
    return Claim(
        id=str(entry["id"]), chapter=int(entry["chapter"]), section=str(entry["section"]), ref=str(entry["ref"]),
        claim=" ".join(str(entry["claim"]).split()),
        quotes=tuple(" ".join(str(q).split()) for q in entry["quotes"]),
        metric=str(entry["metric"]), direction=entry["direction"], a=str(entry["a"]),
        b=tuple(str(x) for x in (b if isinstance(b, list) else [b])), measure=entry["measure"],
        training=bool(entry["training"]), registered_by=str(entry["registered_by"]),
        relative=bool(entry.get("relative", False)), scope=" ".join(str(entry.get("scope", "")).split()),
        max_ratio=None if entry.get("max_ratio") is None else float(entry["max_ratio"]), cells=cells)


@lru_cache(maxsize=None)
def load_ledger() -> tuple[Claim, ...]:
    """Every claim of ``claims.yaml``, in thesis order; ValueError naming the file and claim when malformed."""
    where = "ctrlgen/thesis/claims.yaml"
    data = yaml.safe_load(resources.files("ctrlgen.thesis").joinpath("claims.yaml").read_text(encoding="utf-8"))
    claims = tuple(_parse(entry, where) for entry in data["claims"])
    seen: set[str] = set()
    for claim in claims:
        if claim.id in seen:
            raise ValueError(f"{where}: duplicate claim id {claim.id!r}")
        seen.add(claim.id)
    return claims


def get_claim(claim_id: str) -> Claim:
    """One claim by id; KeyError naming the known ids when absent."""
    for claim in load_ledger():
        if claim.id == claim_id:
            return claim
    raise KeyError(f"no claim {claim_id!r} in the ledger; known: {', '.join(c.id for c in load_ledger())}")


def claim_seeds(cfg: Mapping[str, Any]) -> int:
    """Training seeds per claim from the profile key ``claims.seeds`` (1 when the profile does not set it)."""
    node = cfg.get("claims") if hasattr(cfg, "get") else None
    seeds = node.get("seeds", 1) if isinstance(node, Mapping) else 1
    if int(seeds) < 1:
        raise ValueError(f"profile key claims.seeds is {seeds!r}; expected an integer >= 1")
    return int(seeds)


# ---------------------------------------------------------------- recording (what a chapter calls)
def _values(values: Any, what: str) -> list[float]:
    array = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what}: values must be finite, got {array.tolist()[:8]}")
    return array.tolist()


def _arms(claim: Claim, b: Any) -> dict[str, list[float]]:
    if isinstance(b, Mapping):
        if set(b) != set(claim.b):
            raise ValueError(f"claim {claim.id}: b has arms {sorted(b)}, the ledger compares with {list(claim.b)}")
        return {arm: _values(b[arm], f"claim {claim.id}, arm {arm!r}") for arm in claim.b}
    if len(claim.b) != 1:
        raise ValueError(f"claim {claim.id} compares with {len(claim.b)} arms {list(claim.b)}: pass b as a dict arm -> values")
    return {claim.b[0]: _values(b, f"claim {claim.id}, arm {claim.b[0]!r}")}


def record_claim(run: Any, claim_id: str, a: Any, b: Any, *, paired: bool | None = None, seeds: int = 1,
                 note: str = "") -> dict[str, Any]:
    """Store the measurement behind ``claim_id`` in the chapter run's record (``run.metrics["claims"]``).

    ``a``: the values of the arm the claim favours; ``b``: the compared arm's values, or a dict arm -> values
    when the claim compares with several arms (names as in the ledger). Units follow the claim's ``measure``:
    per-sample values (paired: same order and length in both arms), one value per training seed, or one
    exact count. ``seeds``: training seeds behind the values (``claim_seeds(cfg)``); ``paired`` may be given
    to assert the design and must agree with the ledger. Returns the stored entry."""
    claim = get_claim(claim_id)
    chapter = getattr(run, "chapter", "")
    if chapter and not claim.registers(chapter):
        raise ValueError(f"claim {claim_id} is registered by chapter {claim.registered_by!r}, not {chapter!r}")
    if paired is not None and bool(paired) != claim.paired:
        raise ValueError(f"claim {claim_id}: the ledger's design is {MEASURES[claim.measure]}; paired={paired} disagrees")
    a_values = _values(a, f"claim {claim_id}, arm {claim.a!r}")
    arms = _arms(claim, b)
    _check_units(claim, a_values, arms, int(seeds))
    entry = {"a": a_values, "b": arms, "measure": claim.measure, "seeds": int(seeds), "note": note}
    for column, value in entry.items():
        run.log_metric(RECORD_TABLE, claim_id, column, value)
    return entry


def _check_units(claim: Claim, a: list[float], arms: dict[str, list[float]], seeds: int) -> None:
    if seeds < 1:
        raise ValueError(f"claim {claim.id}: seeds={seeds}, expected >= 1")
    for arm, values in arms.items():
        if claim.measure == "count" and (len(a) != 1 or len(values) != 1):
            raise ValueError(f"claim {claim.id} is an exact count: one value per arm, got {len(a)} and {len(values)}")
        if claim.paired and len(values) != len(a):
            raise ValueError(f"claim {claim.id} is paired: arm {arm!r} has {len(values)} values, {claim.a!r} has {len(a)}")
        if claim.measure == "per-seed" and len(a) % seeds:
            raise ValueError(f"claim {claim.id} is per trained model: {len(a)} values is not a multiple of seeds={seeds}")


# ---------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Comparison:
    """``a`` against one arm: mean difference (a − b), signed effect (positive = the claimed direction),
    its bootstrap interval (signed), the test's p-value and the per-arm outcome."""

    arm: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    difference: float
    signed: float
    ci: tuple[float, float] | None
    p: float | None
    test: str
    outcome: str
    why: str

    @property
    def relative(self) -> float | None:
        """Relative gain (a − b)/|b| as the thesis quotes percentages; None when b's mean is 0."""
        return None if self.mean_b == 0 else self.difference / abs(self.mean_b)


def _seed_for(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def bootstrap_ci(a: Sequence[float], b: Sequence[float], paired: bool, level: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) − mean(b) (``scipy.stats.bootstrap``): pairs resampled
    together when ``paired``, each arm on its own otherwise."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if paired:
        def statistic(x, y, axis=-1):
            return np.mean(x - y, axis=axis)
    else:
        def statistic(x, y, axis=-1):
            return np.mean(x, axis=axis) - np.mean(y, axis=axis)
    if (np.ptp(a - b) == 0) if paired else (np.ptp(a) == 0 and np.ptp(b) == 0):
        d = float(np.mean(a) - np.mean(b))  # no variation: every resample gives the same statistic
        return d, d
    res = stats.bootstrap((a, b), statistic, paired=paired, vectorized=True, n_resamples=N_RESAMPLES,
                          confidence_level=level, method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def two_sided_test(a: Sequence[float], b: Sequence[float], measure: str) -> tuple[float, str]:
    """p-value and test name: Wilcoxon signed-rank (paired samples), Mann–Whitney U (unpaired samples),
    paired t-test (per training seed, same seeds in both arms) — all two-sided, from scipy.stats."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if measure == "paired":
        if np.all(a == b):
            return 1.0, "Wilcoxon signed-rank"
        return float(stats.wilcoxon(a, b).pvalue), "Wilcoxon signed-rank"
    if measure == "unpaired":
        return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue), "Mann–Whitney U"
    d = a - b
    if np.ptp(d) == 0:  # t undefined: identical differences are exact evidence when non-zero
        return (0.0 if d[0] != 0 else 1.0), "paired t-test (constant difference)"
    return float(stats.ttest_rel(a, b).pvalue), "paired t-test"


def compare_arm(claim: Claim, arm: str, a: Sequence[float], b: Sequence[float], alpha: float) -> Comparison:
    """One arm of a claim under the verdict rules of the module docstring (α already split over arms)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    sign = 1.0 if claim.direction == "higher" else -1.0
    diff = float(a.mean() - b.mean())
    base = dict(arm=arm, n_a=a.size, n_b=b.size, mean_a=float(a.mean()), mean_b=float(b.mean()),
                difference=diff, signed=sign * diff)
    if claim.measure == "count":
        return _count_outcome(claim, base)
    if a.size < 2 or b.size < 2:
        unit = "training seed" if claim.measure == "per-seed" else "sample"
        seen = "the claimed direction" if sign * diff > 0 else ("a tie" if diff == 0 else "the opposite direction")
        return Comparison(**base, ci=None, p=None, test="none", outcome="inconclusive",
                          why=f"one {unit} per arm: no interval or test (observed {seen})")
    lo, hi = bootstrap_ci(a, b, claim.paired, 1 - alpha, _seed_for(claim.id + arm))
    signed_ci = (sign * lo, sign * hi) if sign > 0 else (sign * hi, sign * lo)
    p, test = two_sided_test(a, b, claim.measure)
    if signed_ci[0] > 0 and p < alpha:
        outcome, why = "reproduced", f"interval above 0 and p < {alpha:.3g}"
    elif signed_ci[1] < 0 and p < alpha:
        outcome, why = "not reproduced", f"interval below 0 (opposite direction) and p < {alpha:.3g}"
    else:
        outcome = "inconclusive"
        why = "interval includes 0" if signed_ci[0] <= 0 <= signed_ci[1] else f"p = {p:.3g} ≥ {alpha:.3g}"
    return Comparison(**base, ci=signed_ci, p=p, test=test, outcome=outcome, why=why)


def _count_outcome(claim: Claim, base: dict[str, Any]) -> Comparison:
    signed = base["signed"]
    ratio = base["mean_a"] / base["mean_b"] if base["mean_b"] else math.inf
    if signed > 0 and (claim.max_ratio is None or ratio <= claim.max_ratio):
        outcome, why = "reproduced", "exact count in the claimed direction"
    elif signed > 0:
        outcome, why = "not reproduced", f"direction holds but ratio {ratio:.3g} > {claim.max_ratio:g}"
    elif signed < 0:
        outcome, why = "not reproduced", "exact count in the opposite direction"
    else:
        outcome, why = "inconclusive", "exact tie"
    if claim.max_ratio is not None:
        why += f" (a/b = {ratio:.3g}, claim bound ≤ {claim.max_ratio:g})"
    return Comparison(**base, ci=None, p=None, test="exact", outcome=outcome, why=why)


# ---------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Verdict:
    """The verdict on one claim: label, reason, the per-arm comparisons and where the evidence came from."""

    claim: Claim
    verdict: str
    reason: str
    comparisons: tuple[Comparison, ...] = ()
    seeds: int | None = None
    chapter: str = ""
    note: str = ""

    @property
    def single_seed(self) -> bool:
        """True when the claim is about trained models and rests on one training seed."""
        return self.claim.training and self.seeds == 1


def evaluate(claim: Claim, entry: Mapping[str, Any] | None, chapter: str = "", missing: str = "",
             alpha: float = ALPHA) -> Verdict:
    """Apply the verdict rules to one recorded measurement (``entry`` as :func:`record_claim` stored it);
    ``entry=None`` gives "not run" with ``missing`` as the reason."""
    if entry is None:
        return Verdict(claim, "not run", missing or f"no result record holds a measurement for {claim.id}")
    arms = entry["b"] if isinstance(entry["b"], Mapping) else {claim.b[0]: entry["b"]}
    k = len(arms)
    comparisons = tuple(compare_arm(claim, arm, entry["a"], values, alpha / k) for arm, values in arms.items())
    outcomes = [c.outcome for c in comparisons]
    if "not reproduced" in outcomes:
        verdict = "not reproduced"
    elif all(o == "reproduced" for o in outcomes):
        verdict = "reproduced"
    else:
        verdict = "inconclusive"
    split = f" (α = {alpha:g}/{k} per arm)" if k > 1 and claim.measure != "count" else ""
    reason = "; ".join(f"vs {c.arm}: {c.outcome}, {c.why}" for c in comparisons) + split
    seeds = int(entry.get("seeds", 1))
    verdict_obj = Verdict(claim, verdict, reason, comparisons, seeds, chapter, str(entry.get("note", "")))
    if verdict_obj.single_seed and claim.measure != "count":
        reason += ("; rests on one training seed" + ("" if claim.measure == "per-seed" else
                   ": the interval covers test-sample variation, not training variation"))
        verdict_obj = Verdict(claim, verdict, reason, comparisons, seeds, chapter, verdict_obj.note)
    return verdict_obj


def find_measurement(claim: Claim, records: Mapping[str, Mapping[str, Any]]) -> tuple[Mapping[str, Any] | None, str, str]:
    """(entry, chapter, reason-if-missing) for a claim among the chapters' records (chapter -> record)."""
    for chapter, record in records.items():
        entry = (record.get("metrics") or {}).get(RECORD_TABLE, {}).get(claim.id)
        if entry is not None:
            return entry, chapter, ""
    owners = [c for c in records if claim.registers(c)]
    if owners:
        return None, "", f"the record of {', '.join(owners)} has no measurement for this claim"
    return None, "", f"no result record of chapter {claim.registered_by!r} in this run (experiment absent)"


def verdicts(records: Mapping[str, Mapping[str, Any]], ledger: Sequence[Claim] | None = None,
             alpha: float = ALPHA) -> list[Verdict]:
    """A verdict for every claim of the ledger; claims nobody measured read "not run" with the reason."""
    out = []
    for claim in ledger if ledger is not None else load_ledger():
        entry, chapter, missing = find_measurement(claim, records)
        out.append(evaluate(claim, entry, chapter, missing, alpha))
    return out


def check_records(ledger: Sequence[Claim], records: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Integrity: for each chapter that has a record, the ids of the claims it registers but did not record.

    Chapters without a record are not listed (their claims read "not run"); an empty dict means every
    chapter that ran recorded all of its claims."""
    problems: dict[str, list[str]] = {}
    for chapter, record in records.items():
        held = (record.get("metrics") or {}).get(RECORD_TABLE, {})
        missing = [c.id for c in ledger if c.registers(chapter) and c.id not in held]
        if missing:
            problems[chapter] = missing
    return problems


def load_records(profile: str, cfg: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every chapter's result record of ``profile`` (chapter -> record), read from the results folder."""
    folder = paths.results_dir(profile, cfg)
    records = {}
    for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"result record {path} is not valid JSON: {err}") from None
        records[str(record.get("chapter", path.stem))] = record
    return records


# ---------------------------------------------------------------- rendering helpers
def thesis_evidence(claim: Claim, precision: int = 3) -> str:
    """The thesis's table cells and quotes for a claim, as one line of text."""
    def fmt(v: Any) -> str:
        return f"{v:.{precision}f}" if isinstance(v, float) else str(v)

    cells = "; ".join(f"{c.label} {fmt(c.value())}" for c in claim.cells)
    quotes = " … ".join(f"“{q}”" for q in claim.quotes)
    return (f"Table {claim.cells[0].table}: {cells}. " if cells else "") + quotes


def run_evidence(v: Verdict, precision: int = 3) -> str:
    """This run's numbers for a verdict: per arm the means, difference, interval and p-value."""
    if not v.comparisons:
        return "–"
    parts = []
    for c in v.comparisons:
        text = f"{v.claim.a} {c.mean_a:.{precision}g} vs {c.arm} {c.mean_b:.{precision}g} (n = {c.n_a}/{c.n_b})"
        text += f"; a − b = {c.difference:+.{precision}g}"
        if v.claim.relative and c.relative is not None:
            text += f" ({100 * c.relative:+.1f}%)"
        if c.ci is not None:
            text += f", signed CI [{c.ci[0]:+.{precision}g}, {c.ci[1]:+.{precision}g}], {c.test} p = {c.p:.2g}"
        parts.append(text)
    seeds = f" · {v.seeds} training seed{'s' if v.seeds != 1 else ''}" if v.claim.training else ""
    return "; ".join(parts) + seeds + (f" · {v.note}" if v.note else "")


def ledger_table(records: Mapping[str, Mapping[str, Any]], ledger: Sequence[Claim] | None = None):
    """A DataFrame, one row per claim: reference, claim, thesis evidence, this run, verdict, reason."""
    rows = []
    for v in verdicts(records, ledger):
        c = v.claim
        rows.append({"id": c.id, "chapter": c.chapter, "section": f"§{c.section}", "reference": c.ref,
                     "claim": c.claim + (f" [measured: {c.scope}]" if c.scope else ""),
                     "measurement": f"{c.metric} — {MEASURES[c.measure]}",
                     "thesis evidence": thesis_evidence(c), "this run": run_evidence(v), "verdict": v.verdict,
                     "reason": v.reason, "registered by": v.chapter or c.registered_by})
    return pd.DataFrame(rows).set_index("id")
