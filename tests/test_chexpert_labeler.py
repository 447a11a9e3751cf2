"""The CheXpert-style labeler: the labeler's own golden reports, hand-labelled sentences per rule family, the
world's known labels, IU X-ray's Problems annotations, and the clinical F1 by hand."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctrlgen.data.readers.cxr import CHEXPERT_LABELS
from ctrlgen.data.worlds.cxr import sample_labels, write_report
from ctrlgen.metrics.chexpert_labeler import (
    RULES_FILE, agreement, clean, clinical_scores, label_report, load_rules, per_report_f1,
)

SHARED = Path(os.environ.get("CTRLGEN_DATA_ROOT", "/work/shared/data")) / "cxr"
LABELER = SHARED / "chexpert_labeler"


def _row(values: dict) -> dict:
    return {o: values.get(o) for o in CHEXPERT_LABELS}


def test_clean_as_chexpert_loader():
    assert clean("Heart/lungs normal..Effusion,none") == "heart or lungs normal. effusion, none"
    assert clean("effusion and/or edema") == "effusion or edema"


NF = {"No Finding": 1.0}


@pytest.mark.parametrize("text, expected", [
    ("No pleural effusion.", {"Pleural Effusion": 0.0, **NF}),
    ("Small left pleural effusion.", {"Pleural Effusion": 1.0}),
    ("Pleural effusion cannot be excluded.", {"Pleural Effusion": -1.0}),     # pre-negation uncertainty
    ("Cannot exclude pneumonia.", {"Pneumonia": -1.0}),
    ("No new consolidation.", {"Consolidation": -1.0}),                      # CheXpert: "no new XXX" uncertain
    ("Possible right lower lobe atelectasis.", {"Atelectasis": -1.0}),
    ("The heart size is normal.", {"Cardiomegaly": 0.0, **NF}),              # "XXX is normal"
    ("Stable cardiac silhouette.", {"Cardiomegaly": 0.0, **NF}),             # added rule: stable silhouette
    ("Stable mild cardiomegaly.", {"Cardiomegaly": 1.0}),                    # ... not stable cardiomegaly
    ("Small pericardial effusion.", NF),                                     # unmention: not a pleural effusion
    ("Mild pulmonary vascular congestion.", {"Edema": -1.0}),                # uncertain by itself
    ("Findings of chf.", {"Edema": 1.0, "Cardiomegaly": -1.0}),              # chf adds an uncertain Cardiomegaly
    ("Effusion has resolved.", {"Pleural Effusion": 0.0, **NF}),
    ("Endotracheal tube in place. Lungs are clear.", {"Support Devices": 1.0, **NF}),  # devices keep No Finding
    ("Mild emphysema.", {}),                                                 # another finding: no No Finding
    ("There is no focal air space opacity to suggest a pneumonia.",          # no NN to suggest XXX
     {"Lung Opacity": 0.0, "Pneumonia": 0.0, **NF}),
    ("Heart size, mediastinal contour, and pulmonary vascularity are within normal limits.",
     {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": 0.0, **NF}),
    ("The heart size is at the upper limits of normal.", {"Cardiomegaly": 0.0, **NF}),
    ("The cardiac silhouette is borderline enlarged.", {"Cardiomegaly": -1.0}),
])
def test_hand_labelled_sentences(text, expected):
    assert label_report(text) == _row(expected)


def test_conflicting_mentions_aggregate_as_chexpert():
    # negative + positive -> positive; negative + uncertain -> uncertain
    assert label_report("No effusion on the right. Left effusion.")["Pleural Effusion"] == 1.0
    assert label_report("No effusion on the right. Possible left effusion.")["Pleural Effusion"] == -1.0


@pytest.mark.skipif(not (LABELER / "labeled_reports.csv").is_file(), reason="needs shared/data/cxr/chexpert_labeler")
def test_golden_reports_of_the_chexpert_labeler_exactly():
    table = pd.read_csv(LABELER / "labeled_reports.csv")
    for _, r in table.iterrows():
        expected = {o: None if pd.isna(r[o]) else float(r[o]) for o in CHEXPERT_LABELS}
        assert label_report(r["Reports"]) == expected, r["Reports"]


@pytest.mark.skipif(not (LABELER / "phrases").is_dir(), reason="needs shared/data/cxr/chexpert_labeler")
def test_shipped_phrase_lists_are_the_labelers_verbatim():
    rules = load_rules()
    for kind, table in (("mention", rules.mention), ("unmention", rules.unmention)):
        for path in (LABELER / "phrases" / kind).glob("*.txt"):
            obs = path.stem.replace("_", " ").title()
            lines = [l.strip().replace("_", " ") for l in path.read_text().splitlines() if l.strip()]
            assert [p.pattern.replace(r"\s+", " ") for p in table[obs]] == lines
    assert "MIT License" in RULES_FILE.read_text() and "Stanford Machine Learning Group" in RULES_FILE.read_text()


def test_the_worlds_reports_give_back_their_labels():
    labels = sample_labels(200, 3)
    pred = [label_report(write_report(labels.iloc[i])) for i in range(len(labels))]
    truth = [{o: None if pd.isna(labels.iloc[i][o]) else float(labels.iloc[i][o]) for o in CHEXPERT_LABELS}
             for i in range(len(labels))]
    a = agreement(pred, truth)
    # every positive is found; the world writes "The lungs are clear." for a negative Lung Opacity, which has no
    # CheXpert mention (blank, as the real labeler gives), and nothing for a negative Support Devices
    for obs in CHEXPERT_LABELS:
        if a[obs]["support"]:
            assert a[obs]["recall"] == 1.0, obs
    for obs in ("Edema", "Pleural Effusion", "Pneumothorax", "Atelectasis", "Consolidation", "No Finding"):
        assert a[obs]["exact"] == 1.0, obs


@pytest.mark.skipif(not (SHARED / "iu_xray" / "indiana_reports.csv").is_file(), reason="needs shared/data/cxr/iu_xray")
def test_iu_xray_problems_agreement_is_measured_and_well_above_chance():
    from ctrlgen.experiments.ch06_cxr_irgen import iu_problem_labels
    reports = pd.read_csv(SHARED / "iu_xray" / "indiana_reports.csv").head(600)
    texts, truth = iu_problem_labels(reports)
    a = agreement([label_report(t) for t in texts], truth, ["No Finding", "Cardiomegaly", "Pleural Effusion"])
    assert a["Pleural Effusion"]["F1"] > 0.7 and a["Cardiomegaly"]["F1"] > 0.5 and a["No Finding"]["F1"] > 0.6


def test_clinical_scores_micro_by_hand():
    gen = [_row({"Cardiomegaly": 1.0, "Edema": 1.0}), _row({"Pleural Effusion": -1.0})]
    ref = [_row({"Cardiomegaly": 1.0}), _row({"Pleural Effusion": 1.0, "Edema": 0.0})]
    # present = 1.0: tp 1 (cardiomegaly), fp 1 (edema), fn 1 (effusion, generated uncertain)
    s = clinical_scores(gen, ref)
    assert s == pytest.approx({"precision": 0.5, "recall": 0.5, "F1": 0.5})
    # uncertain as present: the effusion becomes a tp -> P 2/3, R 1
    s = clinical_scores(gen, ref, uncertain="positive")
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == 1.0 and s["F1"] == pytest.approx(0.8)
    assert per_report_f1(gen, ref).tolist() == pytest.approx([2 / 3, 0.0])
    assert per_report_f1([_row({})], [_row({})]).tolist() == [1.0]


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="2 generated, 1 reference"):
        clinical_scores([_row({})] * 2, [_row({})])
    with pytest.raises(ValueError, match="must be str"):
        label_report(None)
    with pytest.raises(ValueError, match="uncertain='maybe'"):
        clinical_scores([_row({})], [_row({})], uncertain="maybe")
    bad = tmp_path / "rules.yaml"
    bad.write_text("mention: {}\n")
    with pytest.raises(ValueError, match="rules.yaml: CheXpert rule data lacks"):
        load_rules(bad)
    assert np.isfinite(clinical_scores([_row({})], [_row({})])["F1"])
