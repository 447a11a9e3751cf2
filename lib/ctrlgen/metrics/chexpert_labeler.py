"""A CheXpert-style rule labeler and the clinical-efficacy F1 of generated reports (thesis §6.4.2).

The CheXpert labeler (Irvin et al. 2019, stanfordmlgroup/chexpert-labeler) labels a report in three steps, and
this module follows them:

1. **Mention extraction** — the report is cleaned as its ``load.py`` does (lower case, "and/or" → "or",
   "a/b" → "a or b", a space after "." and ","), split into sentences, and every mention phrase of every
   observation (its ``phrases/mention/*.txt``, "_" a space, spaces matching any whitespace, case-insensitive
   regular expressions, so "atelecta" matches "atelectasis") is found; a match that overlaps one of the
   observation's unmention phrases ("pericardial effusion" is not a Pleural Effusion) is dropped.
2. **Classification** of each mention as uncertain, negative or positive, in CheXpert's order: pre-negation
   uncertainty ("cannot exclude X" must not read as a negation), negation, post-negation uncertainty. CheXpert
   does this with NegBio's dependency-graph patterns on a parse; no parser is available offline here, so the
   book uses a NegEx-style translation (Chapman et al. 2001) of those patterns' cases into word cues with a
   scope (``chexpert_rules.yaml``, each family naming its pattern file). This is the one place where the book's
   labeler differs from CheXpert's, and the golden sample reports and IU X-ray agreement measure the effect.
3. **Aggregation** as its ``aggregate.py``: per observation, one mention's label; several: negative and
   uncertain → uncertain, negative and positive → positive, uncertain and positive → positive; no mention →
   blank. "No Finding" = 1 when no observation other than Support Devices (the no_finding.txt phrases — other
   findings such as emphysema — included) is positive or uncertain; a positive or uncertain "chf" or "heart
   failure" adds an uncertain Cardiomegaly.

Labels are 1.0 / 0.0 / −1.0 / ``None`` (blank), in ``CHEXPERT_LABELS`` order.

Clinical efficacy (``clinical_scores``): precision, recall and F1 of the generated reports' labels against the
reference reports' labels, micro-averaged over the 14 observations, a label counted as present when it is 1.0
(uncertain, negative and blank all count as absent) — the convention of the R2Gen family's clinical-efficacy
metrics (Chen et al. 2020; Miura et al. 2020). ``uncertain="positive"`` counts −1 as present instead.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from ctrlgen.data.readers.cxr import CHEXPERT_LABELS

RULES_FILE = Path(__file__).with_name("chexpert_rules.yaml")
NO_FINDING, SUPPORT_DEVICES, CARDIOMEGALY = "No Finding", "Support Devices", "Cardiomegaly"
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
Label = float | None


# ============================================================================== rules
@dataclass(frozen=True)
class Cue:
    """One cue phrase, on which side of the mention it must be and within how many words."""

    pattern: re.Pattern
    window: int


@dataclass(frozen=True)
class CueFamily:
    before: tuple[Cue, ...]
    after: tuple[Cue, ...]
    only: re.Pattern | None = None


@dataclass(frozen=True)
class Rules:
    """The labeler's data: mention and unmention phrases per observation, cue families and terminators."""

    mention: dict[str, tuple[re.Pattern, ...]]
    unmention: dict[str, tuple[re.Pattern, ...]]
    families: dict[str, CueFamily]
    terminator: re.Pattern
    uncertain_mentions: dict[str, tuple[str, ...]]


def _phrase(text: str) -> re.Pattern:
    # chexpert-labeler's compile_pattern: "_" is a space, a space matches any whitespace, case-insensitive
    return re.compile(re.sub(" ", r"\\s+", str(text).replace("_", " ")), re.IGNORECASE)


def _cue(entry, default: int, where: str) -> Cue:
    text, window = (entry, default) if isinstance(entry, str) else (entry[0], int(entry[1]))
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: cue {entry!r} is not a phrase or [phrase, window]")
    return Cue(re.compile(r"\b" + re.sub(" ", r"\\s+", text.strip()) + r"\b", re.IGNORECASE), window)


def load_rules(path: str | Path = RULES_FILE) -> Rules:
    """Read the rule data (default: the book's copy, ``chexpert_rules.yaml``); a missing observation or cue
    family is one error naming the file."""
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = [k for k in ("mention", "unmention", "scope", "terminators", "cues") if k not in (data or {})]
    if missing:
        raise ValueError(f"{path}: CheXpert rule data lacks {missing}")
    if set(data["mention"]) != set(CHEXPERT_LABELS):
        raise ValueError(f"{path}: mention lists must be the 14 CheXpert observations, got {sorted(data['mention'])}")
    scope = data["scope"]
    families = {}
    for name, fam in data["cues"].items():
        families[name] = CueFamily(tuple(_cue(c, scope["before"], f"{path} {name}") for c in fam.get("before", [])),
                                   tuple(_cue(c, scope["after"], f"{path} {name}") for c in fam.get("after", [])),
                                   re.compile(fam["only"], re.IGNORECASE) if fam.get("only") else None)
    for needed in ("pre_negation_uncertainty", "negation", "post_negation_uncertainty"):
        if needed not in families:
            raise ValueError(f"{path}: cue family {needed!r} is missing")
    term = "|".join(r"\b" + re.escape(t) + r"\b" if t[0].isalpha() else re.escape(t) for t in data["terminators"])
    return Rules({o: tuple(map(_phrase, p)) for o, p in data["mention"].items()},
                 {o: tuple(map(_phrase, p)) for o, p in data["unmention"].items()}, families,
                 re.compile(term, re.IGNORECASE),
                 {o: tuple(p) for o, p in (data.get("uncertain_mentions") or {}).items()})


@lru_cache(maxsize=4)
def _rules(path: str) -> Rules:
    return load_rules(path)


# ============================================================================== text
def clean(report: str) -> str:
    """chexpert-labeler ``Loader.clean``: lower case, "and/or" → "or", "a/b" → "a or b", ".." → ".", a space after
    "." and ",", single spaces, empty sentences removed."""
    text = re.sub("and/or", "or", str(report).lower())
    text = re.sub(r"(?<=[a-zA-Z])/(?=[a-zA-Z])", " or ", text).replace("..", ".")
    text = " ".join(text.translate(str.maketrans({".": ". ", ",": ", "})).split())
    return re.sub(r"\.\s+\.", ".", text)


def sentences(text: str) -> list[str]:
    """Sentences of a cleaned report: split after a "." that ends a word (not inside "1.5")."""
    return [s.strip() for s in re.split(r"(?<=\.)\s+|\n+", text) if s.strip(" .")]


# ============================================================================== classification
def _words(text: str) -> int:
    return len(re.findall(r"[a-z0-9]+", text))


def _near(cue: Cue, sentence: str, start: int, end: int, side: str, terminator: re.Pattern) -> bool:
    """``cue`` within its window on ``side`` of the mention span [start, end), no terminator between."""
    for m in cue.pattern.finditer(sentence):
        between = sentence[m.end():start] if side == "before" else sentence[end:m.start()]
        if side == "before" and m.end() > start or side == "after" and m.start() < end:
            continue
        if _words(between) <= cue.window and not terminator.search(between):
            return True
    return False


def _fires(family: CueFamily, sentence: str, start: int, end: int, terminator: re.Pattern) -> bool:
    if family.only is not None and not family.only.search(sentence[start:end]):
        return False
    return any(_near(c, sentence, start, end, "before", terminator) for c in family.before) or \
        any(_near(c, sentence, start, end, "after", terminator) for c in family.after)


def classify(sentence: str, start: int, end: int, rules: Rules, observation: str = "") -> float:
    """Label of one mention (CheXpert's order: pre-negation uncertainty, negation, post-negation uncertainty)."""
    f, t = rules.families, rules.terminator
    if _fires(f["pre_negation_uncertainty"], sentence, start, end, t):
        return UNCERTAIN
    if any(_fires(fam, sentence, start, end, t) for name, fam in f.items() if name.startswith("negation")):
        return NEGATIVE
    if _fires(f["post_negation_uncertainty"], sentence, start, end, t):
        return UNCERTAIN
    if sentence[start:end].lower() in rules.uncertain_mentions.get(observation, ()):
        return UNCERTAIN
    return POSITIVE


@dataclass(frozen=True)
class Mention:
    observation: str
    text: str
    sentence: str
    label: float


def mentions(report: str, rules: Rules) -> list[Mention]:
    """Every mention in ``report`` with its label (step 1 and 2 of the module doc)."""
    out = []
    for s in sentences(clean(report)):
        for obs, phrases in rules.mention.items():
            blocked = [m.span() for p in rules.unmention.get(obs, ()) for m in p.finditer(s)]
            for p in phrases:
                for m in p.finditer(s):
                    a, b = m.span()
                    if any(a < ub and ua < b for ua, ub in blocked):
                        continue
                    out.append(Mention(obs, s[a:b], s, classify(s, a, b, rules, obs)))
    return out


def _aggregate(labels: Sequence[float]) -> float:
    # chexpert-labeler Aggregator.dict_to_vec
    values = set(labels)
    if len(values) == 1:
        return labels[0]
    if NEGATIVE in values and UNCERTAIN in values and POSITIVE not in values:
        return UNCERTAIN
    return POSITIVE


def label_report(report: str, rules: Rules | None = None) -> dict[str, Label]:
    """The 14 CheXpert labels of one report (1.0, 0.0, −1.0 or None), as chexpert-labeler's aggregate step."""
    if not isinstance(report, str):
        raise ValueError(f"a report must be str, got {type(report).__name__}")
    rules = rules or _rules(str(RULES_FILE))
    by_obs: dict[str, list[float]] = {}
    no_finding = True
    for m in mentions(report, rules):
        if m.observation != SUPPORT_DEVICES and m.label in (POSITIVE, UNCERTAIN):
            no_finding = False
        if m.observation == NO_FINDING:
            continue
        if m.label in (POSITIVE, UNCERTAIN) and m.text.lower() in ("chf", "heart failure"):
            by_obs.setdefault(CARDIOMEGALY, []).append(UNCERTAIN)
        by_obs.setdefault(m.observation, []).append(m.label)
    out: dict[str, Label] = {o: (_aggregate(by_obs[o]) if o in by_obs else None) for o in CHEXPERT_LABELS}
    out[NO_FINDING] = POSITIVE if no_finding else None
    return out


def label_reports(reports: Sequence[str], rules: Rules | None = None) -> list[dict[str, Label]]:
    """``label_report`` for each report."""
    return [label_report(r, rules) for r in reports]


# ============================================================================== clinical efficacy
def label_matrix(labels: Sequence[Mapping[str, Label]], uncertain: Literal["negative", "positive"] = "negative"
                 ) -> np.ndarray:
    """``(N, 14)`` 0/1: an observation is present when its label is 1.0 (and −1.0 with ``uncertain="positive"``)."""
    if uncertain not in ("negative", "positive"):
        raise ValueError(f"uncertain={uncertain!r}: expected 'negative' or 'positive'")
    present = (POSITIVE, UNCERTAIN) if uncertain == "positive" else (POSITIVE,)
    return np.array([[float(l.get(o) in present) for o in CHEXPERT_LABELS] for l in labels]).reshape(len(labels), -1)


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def clinical_scores(generated: Sequence[Mapping[str, Label]], reference: Sequence[Mapping[str, Label]],
                    uncertain: Literal["negative", "positive"] = "negative") -> dict[str, float]:
    """Micro precision, recall and F1 over the 14 observations (module doc) of generated against reference labels."""
    if len(generated) != len(reference) or not generated:
        raise ValueError(f"clinical scores need one generated label set per reference (and at least one): "
                         f"{len(generated)} generated, {len(reference)} reference")
    g, r = label_matrix(generated, uncertain), label_matrix(reference, uncertain)
    p, rec, f1 = _prf((g * r).sum(), (g * (1 - r)).sum(), ((1 - g) * r).sum())
    return {"precision": p, "recall": rec, "F1": f1}


def per_report_f1(generated: Sequence[Mapping[str, Label]], reference: Sequence[Mapping[str, Label]],
                  uncertain: Literal["negative", "positive"] = "negative") -> np.ndarray:
    """F1 of each report's present observations against its reference's (1.0 when both have none): the unit of
    the chapter's paired comparisons."""
    g, r = label_matrix(generated, uncertain), label_matrix(reference, uncertain)
    out = []
    for gi, ri in zip(g, r):
        tp, fp, fn = (gi * ri).sum(), (gi * (1 - ri)).sum(), ((1 - gi) * ri).sum()
        out.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return np.asarray(out)


def agreement(predicted: Sequence[Mapping[str, Label]], truth: Sequence[Mapping[str, Label]],
              observations: Sequence[str] = CHEXPERT_LABELS) -> dict[str, dict[str, float]]:
    """Per observation: exact agreement of the four-valued labels and P/R/F1 of "present" (1.0) — the labeler
    measured against known labels (the world's, or IU X-ray's annotations mapped to observations). P/R/F1 are NaN
    for an observation present on neither side."""
    out = {}
    for o in observations:
        p = np.array([l.get(o) == POSITIVE for l in predicted])
        t = np.array([l.get(o) == POSITIVE for l in truth])
        prec, rec, f1 = _prf(float((p & t).sum()), float((p & ~t).sum()), float((~p & t).sum()))
        if not (p | t).any():   # no positive on either side: P/R/F1 undefined, not 0
            prec = rec = f1 = float("nan")
        exact = float(np.mean([a.get(o) == b.get(o) for a, b in zip(predicted, truth)]))
        out[o] = {"exact": exact, "precision": prec, "recall": rec, "F1": f1, "support": float(t.sum())}
    return out


__all__ = ["RULES_FILE", "Rules", "load_rules", "clean", "sentences", "classify", "Mention", "mentions", "label_report",
           "label_reports", "label_matrix", "clinical_scores", "per_report_f1", "agreement"]
