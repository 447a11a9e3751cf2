"""Report metrics: BLEU-1..4 and ROUGE-L as the report-generation baselines compute them (thesis §6.4.2).

``nlg_scores`` is R2Gen's ``compute_scores`` (Chen et al. 2020): the COCO caption scorers of ``pycocoevalcap``
called on ``{i: [reference]}`` / ``{i: [hypothesis]}`` with the texts already normalised and split on spaces
(R2Gen's IU X-ray cleaning: ``ctrlgen.methods.cxr_irgen.clean_report``). BLEU-n is the corpus BLEU of
Papineni et al. over all reports (clipped n-gram counts summed over the corpus, geometric mean of the 1..n
precisions, brevity penalty from the closest reference length); pycocoevalcap adds 1e-15 / 1e-9 to the counts
so that a zero precision gives a tiny score instead of 0. ROUGE-L is the LCS F-measure with β = 1.2 per report,
averaged over reports (Lin 2004, as pycocoevalcap's ``Rouge``).

Cross-checks beside them (``sacrebleu_scores``, ``rouge_score_l``): sacrebleu's ``BLEU`` with
``tokenize="none"`` and ``smooth_method="none"`` equals pycocoevalcap's BLEU up to that smoothing (they differ
when some n-gram precision is 0: sacrebleu then gives 0). rouge-score's ``rougeL`` differs by definition twice:
its default tokenizer drops punctuation tokens (the " . " of cleaned reports) and its F is β = 1; with a
whitespace tokenizer and its precision/recall combined with β = 1.2 it equals pycocoevalcap's ROUGE-L.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

BLEU_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
ROUGE_BETA = 1.2   # pycocoevalcap Rouge's β


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"report metrics need one hypothesis per reference (and at least one): "
                         f"{len(hypotheses)} hypotheses, {len(references)} references")
    for what, texts in (("hypothesis", hypotheses), ("reference", references)):
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"{what} {bad[0]} is {type(texts[bad[0]]).__name__}, expected str")


def _dicts(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[dict, dict]:
    # pycocoevalcap asserts one non-empty-list hypothesis per id; an empty text stays an empty sentence
    return {i: [r] for i, r in enumerate(references)}, {i: [h] for i, h in enumerate(hypotheses)}


def nlg_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 and mean ROUGE-L (pycocoevalcap, as R2Gen's ``compute_scores``)."""
    _check(hypotheses, references)
    gts, res = _dicts(hypotheses, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    return {**dict(zip(BLEU_NAMES, map(float, bleu))), "ROUGE-L": float(rouge)}


def per_report_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-report BLEU-1..4 (pycocoevalcap's sentence scores) and ROUGE-L: the units of paired comparisons."""
    _check(hypotheses, references)
    gts, res = _dicts(hypotheses, references)
    _, bleu = Bleu(4).compute_score(gts, res, verbose=0)
    _, rouge = Rouge().compute_score(gts, res)
    return {**{n: np.asarray(b, dtype=float) for n, b in zip(BLEU_NAMES, bleu)}, "ROUGE-L": np.asarray(rouge, dtype=float)}


def sacrebleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 by sacrebleu on the same space-split tokens (``tokenize="none"``, no smoothing), in [0, 1]."""
    _check(hypotheses, references)
    return {name: BLEU(max_ngram_order=n, tokenize="none", smooth_method="none", force=True)
            .corpus_score(list(hypotheses), [list(references)]).score / 100 for n, name in enumerate(BLEU_NAMES, 1)}


class _Whitespace:
    """rouge-score tokenizer that splits on spaces only (pycocoevalcap's tokens)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def rouge_score_l(hypotheses: Sequence[str], references: Sequence[str], as_coco: bool = False) -> float:
    """Mean ROUGE-L by rouge-score: its own definition (default tokenizer, F1), or with ``as_coco`` the
    whitespace tokens and β = 1.2 of pycocoevalcap (module doc)."""
    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Whitespace() if as_coco else None)
    values = []
    for h, r in zip(hypotheses, references):
        s = scorer.score(r, h)["rougeL"]
        if not as_coco:
            values.append(s.fmeasure)
            continue
        p, rec = s.precision, s.recall
        values.append((1 + ROUGE_BETA ** 2) * p * rec / (rec + ROUGE_BETA ** 2 * p) if p and rec else 0.0)
    return float(np.mean(values))


__all__ = ["BLEU_NAMES", "nlg_scores", "per_report_scores", "sacrebleu_scores", "rouge_score_l"]
