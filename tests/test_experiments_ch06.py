"""Chapter 6's experiment layer: profile settings, NIH label mapping, Table 6.1/6.2 measures, the chapter on smoke."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ctrlgen import paths
from ctrlgen.config import load_profile
from ctrlgen.data.readers.cxr import CHEXPERT_LABELS
from ctrlgen.experiments import ch06_cxr_irgen as ch06
from ctrlgen.methods.cxr_irgen import label_prompt
from ctrlgen.thesis.claims import load_ledger

ROOT = Path(__file__).resolve().parents[1]


def test_config_reads_the_profile_with_types():
    ec = ch06.Ch06Config.from_profile(load_profile("smoke"))
    assert (ec.short_steps, ec.long_steps) == (2, 4) and ec.steps_of("long") == 4
    assert ec.prior_lambda == 0.01 and isinstance(ec.uvit_width, int) and ec.image_encoder == "latent_projection"
    full = ch06.Ch06Config.from_profile(load_profile("full"))
    assert (full.short_steps, full.long_steps, full.n_table_6_1, full.n_per_label) == (5000, 10000, 1000, 500)


def test_nih_labels_become_chexpert_observations_with_blanks():
    nih = {"Effusion": 1.0, "Mass": 1.0, "Infiltration": 1.0, "Cardiomegaly": 0.0}
    lab = ch06.nih_to_chexpert(nih)
    assert set(lab) == set(CHEXPERT_LABELS)
    assert {k for k, v in lab.items() if v is not None} == {"Pleural Effusion", "Lung Lesion"}
    assert label_prompt(lab) == "A chest X-Ray image with lung lesion, pleural effusion"
    none = ch06.nih_to_chexpert({"Effusion": 0.0})
    assert none["No Finding"] == 1.0 and label_prompt(none) == "A chest X-Ray image with no finding"
    only_unmapped = ch06.nih_to_chexpert({"Hernia": 1.0})
    assert all(v is None for v in only_unmapped.values()) and label_prompt(only_unmapped) == "A chest X-Ray image"


def test_auroc_row_separates_each_pathology_from_no_finding():
    nan = np.full(2, np.nan)
    scores = {obs: {o: np.array([0.9, 0.8]) if o == obs else np.array([0.5, 0.5]) for o in ch06.CAPTION_NAMES}
              for obs in ch06.TABLE_6_2}
    scores[ch06.NO_FINDING] = {o: np.array([0.1, 0.85]) for o in ch06.CAPTION_NAMES}
    scores["Lung Opacity"]["Lung Opacity"] = nan             # a finding the classifier does not know
    row = ch06.auroc_row(scores)
    # positives 0.9, 0.8 vs negatives 0.1, 0.85: 3 of 4 pairs ordered -> 0.75
    assert row["Cardiomegaly"] == pytest.approx(0.75) and math.isnan(row["Lung opacity"])
    assert row["Mean"] == pytest.approx(0.75)


def test_psnr_ssim_match_scikit_image_per_pair():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(2, 3, 32, 32, generator=g)
    gen = (real + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)
    psnr, ssim = ch06.psnr_ssim(gen, real)
    for i in range(2):
        a, b = real[i].permute(1, 2, 0).numpy(), gen[i].permute(1, 2, 0).numpy()
        assert psnr[i] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-4)
        # torchmetrics: Gaussian window σ = 1.5 (11 px), as skimage with gaussian_weights and no sample covariance
        ref = structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ssim[i] == pytest.approx(ref, abs=2e-2)


def test_every_ch06_claim_is_registered_by_this_chapter():
    mine = {c.id for c in load_ledger() if c.registers("ch06_cxr_irgen")}
    assert mine == {"ch6.t61_finetuning", "ch6.t61_5k_vs_10k", "ch6.t61_rie_fid", "ch6.t62_rie_auroc",
                    "ch6.t62_finetuning_auroc", "ch6.t65_embedding_input", "ch6.t65_prior_loss", "ch6.fig65_mean_embedding",
                    "ch6.t63_f1", "ch6.t64_f1_generated", "ch6.t64_rie_f1"}
    assert {c.id for c in load_ledger() if c.chapter == 6} == mine


def test_clinical_config_and_report_row_f1_by_hand():
    cc = ch06.ClinicalConfig.from_profile(load_profile("smoke"))
    assert cc.uncertain == "negative" and isinstance(cc.slots, int) and cc.steps >= 1
    hyp = ["the heart is enlarged . no effusion .", "small left pleural effusion ."]
    ref = ["cardiomegaly . small right effusion .", "no pleural effusion ."]
    row = ch06.report_row(hyp, ref, ch06.reference_labels(ref))
    # present labels: hyp {Cardiomegaly}, {Pleural Effusion}; ref {Cardiomegaly, Pleural Effusion}, {No Finding}
    # (No Finding is one of the 14): tp 1, fp 1, fn 2 -> F1 = 2 / (2 + 1 + 2)
    assert row["F1 score↑"] == pytest.approx(0.4) and 0 < row["BLEU-1↑"] < 1


def test_iu_problems_become_observations():
    import pandas as pd
    reports = pd.DataFrame({"findings": ["Heart is enlarged.", None, "Clear."], "impression": ["Cardiomegaly.", None, None],
                            "Problems": ["Cardiomegaly;Calcinosis;Pulmonary Atelectasis", "normal", "normal"]})
    texts, truth = ch06.iu_problem_labels(reports)
    assert texts == ["Heart is enlarged. Cardiomegaly.", "Clear."]   # the empty report is left out
    assert truth == [{"Cardiomegaly": 1.0, "Atelectasis": 1.0}, {"No Finding": 1.0}]


@pytest.mark.slow
def test_the_chapter_runs_on_smoke_and_records_its_tables_and_claims(tmp_path):
    """The whole chapter on smoke from an empty cache (the book build of test_book runs it too)."""
    env = {**os.environ, paths.ENV_CACHE: str(tmp_path / "cache"), paths.ENV_OUTPUT: str(tmp_path / "build")}
    result = subprocess.run([sys.executable, "-m", "ctrlgen.cli.main", "run", "ch06_cxr_irgen", "--profile", "smoke"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, f"ctrlgen run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    record = json.loads((tmp_path / "build" / "results" / "smoke" / "ch06_cxr_irgen.json").read_text())
    for table in ("6.1", "6.2", "6.3", "6.4", "6.5", "ch06.labeler_world", "claims"):
        assert record["metrics"].get(table), table
    assert set(record["metrics"]["claims"]) == {c.id for c in load_ledger() if c.registers("ch06_cxr_irgen")}
