"""BLEU-1..4 and ROUGE-L as R2Gen computes them (pycocoevalcap), beside sacrebleu and rouge-score."""
from __future__ import annotations

import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.rouge.rouge import Rouge

from ctrlgen.metrics.report import nlg_scores, per_report_scores, rouge_score_l, sacrebleu_scores

HYP = ["a b c d"]
REF = ["a b c e"]


def test_a_hand_checked_case():
    s = nlg_scores(HYP, REF)
    # precisions 3/4, 2/3, 1/2, 0/1; equal lengths so no brevity penalty
    assert s["BLEU-1"] == pytest.approx(0.75, abs=1e-6)
    assert s["BLEU-2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-6)
    assert s["BLEU-3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-6)
    assert s["BLEU-4"] < 1e-3            # pycocoevalcap's 1e-15 smoothing, not exactly 0
    # LCS "a b c" = 3 of 4 tokens both ways: P = R = 0.75, so F_β = 0.75 for any β
    assert s["ROUGE-L"] == pytest.approx(0.75)


def test_brevity_penalty_and_rouge_beta_by_hand():
    s = nlg_scores(["a b"], ["a b c d"])
    assert s["BLEU-1"] == pytest.approx(math.exp(1 - 4 / 2), abs=1e-6)   # precision 1, BP = e^(1 − r/c)
    p, r, beta = 1.0, 0.5, 1.2
    assert s["ROUGE-L"] == pytest.approx((1 + beta ** 2) * p * r / (r + beta ** 2 * p))


HYPS = ["the heart is normal . no effusion .", "cardiomegaly . small effusion .", "lungs are clear ."]
REFS = ["the heart size is normal . no pleural effusion .", "cardiomegaly . small right effusion .",
        "the lungs are clear . no pneumothorax ."]


def test_equal_to_calling_pycocoevalcap_as_r2gen_does():
    gts, res = {i: [r] for i, r in enumerate(REFS)}, {i: [h] for i, h in enumerate(HYPS)}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    s, each = nlg_scores(HYPS, REFS), per_report_scores(HYPS, REFS)
    assert [s[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == bleu and s["ROUGE-L"] == rouge
    assert each["BLEU-1"].tolist() == bleu_each[0] and each["ROUGE-L"].tolist() == list(rouge_each)


def test_sacrebleu_agrees_up_to_smoothing():
    coco, sacre = nlg_scores(HYPS, REFS), sacrebleu_scores(HYPS, REFS)
    for name in sacre:
        assert sacre[name] == pytest.approx(coco[name], abs=1e-6)
    # where a precision is 0 they differ by definition: sacrebleu (no smoothing) gives 0, pycocoevalcap a tiny value
    assert sacrebleu_scores(HYP, REF)["BLEU-4"] == 0.0 and 0 < nlg_scores(HYP, REF)["BLEU-4"] < 1e-3


def test_rouge_score_agrees_with_whitespace_tokens_and_beta_1_2_and_differs_by_default():
    coco = nlg_scores(HYPS, REFS)["ROUGE-L"]
    assert rouge_score_l(HYPS, REFS, as_coco=True) == pytest.approx(coco, abs=1e-12)
    # rouge-score's own definition drops the " . " tokens and uses F1: a different number
    assert abs(rouge_score_l(HYPS, REFS) - coco) > 1e-3


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="2 hypotheses, 1 references"):
        nlg_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="hypothesis 0 is NoneType"):
        nlg_scores([None], ["a"])
