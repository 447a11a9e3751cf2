"""Chapter 4 part II's experiments on tiny inputs: augmentation counts, table layouts, "not run" rows, the pairing of
the significance tests, the Fig. 4.11 split, and (when the harness's profile sections exist) the chapter on smoke."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import f1_score

from ctrlgen.config import ConfigError, load_profile
from ctrlgen.downstream import FitSettings, TaskSettings
from ctrlgen.experiments import ch04_downstream as d
from ctrlgen.experiments.ch04_downstream import (
    HAM,
    MINORITY,
    ORIGINAL,
    SCALE_LABELS,
    ClassificationRun,
    ClassSamples,
    ClassSets,
    DownstreamConfig,
    NotRun,
    PairSet,
    SegmentationRun,
    SegSets,
)

SIDE = 32
FIT = FitSettings(max_epochs=1, batch_size=4, lr=1e-3, patience=1)


@pytest.fixture
def cfg(tmp_path):
    return load_profile("smoke", {"paths.cache_root": str(tmp_path / "cache")})


@pytest.fixture
def dc(cfg):
    return DownstreamConfig.from_profile(cfg)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _class_sets(n_per: int = 2) -> ClassSets:
    y = np.array([c for c in HAM for _ in range(n_per)], dtype=object)
    x = _images(len(y))
    return ClassSets(x, y, x[:7], np.array(HAM, dtype=object), x[:7], np.array(HAM, dtype=object),
                     x[:2], np.array(["mel", "nv"], dtype=object), "PH2 (test)", ("mel", "nv"), "test data")


def _samples(n: int, classes=MINORITY) -> ClassSamples:
    return ClassSamples("G", {c: _images(n, k) for k, c in enumerate(classes)})


# --------------------------------------------------------------------------- settings
def test_config_reads_the_profile_with_types(cfg, dc):
    s = cfg.ch04_downstream
    assert dc.n_per_class == s.classification.n_per_class and isinstance(dc.scales, tuple) and len(dc.scales) == 2
    assert dc.num_steps == cfg.didgen.pairs.num_steps
    # chapter 4 trains the harness's models with its defaults (§4.7.2): one home, downstream.<task>
    assert dc.segmenters == tuple(cfg.downstream.segmentation.models)
    assert dc.classifiers == tuple(cfg.downstream.classification.models)
    assert dc.gain_bins[0] == 0.0 and dc.gain_bins[-1] == 1.0
    # early stopping: validation accuracy as §4.7.2 in full; macro F1 where the draws are class-balanced
    full = DownstreamConfig.from_profile(load_profile("full"))
    assert (full.val_metric, load_profile("full").downstream.classification.sampling) == ("accuracy", "shuffle")
    assert DownstreamConfig.from_profile(load_profile("mini")).val_metric == "macro_f1"
    with pytest.raises(ConfigError, match="ch04_downstream.classification.val_metric"):
        load_profile("smoke", {"ch04_downstream.classification.val_metric": "auc"})
    with pytest.raises(ConfigError, match="downstream.classification.sampling"):
        load_profile("smoke", {"downstream.classification.sampling": "oversample"})


# --------------------------------------------------------------------------- augmentation
def test_augmentation_adds_exactly_n_per_minority_class_and_never_nv():
    sets = _class_sets()
    x, y = d.augment_classification(sets.train_x, sets.train_y, _samples(3), SIDE)
    before, after = pd.Series(sets.train_y).value_counts(), pd.Series(y).value_counts()
    for c in MINORITY:
        assert after[c] - before[c] == 3
    assert after["nv"] == before["nv"] and len(x) == len(y) == len(sets.train_y) + 3 * len(MINORITY)
    torch.testing.assert_close(x[:len(sets.train_x)], sets.train_x)  # the real images first, unchanged


def test_classes_without_training_images_get_no_synthetic_images():
    y = np.array(["nv", "nv", "mel", "df"], dtype=object)
    classes, note = d.present_classes(y)
    assert classes == ["mel", "df"] and "BCC, AKIEC, BKL, VASC" in note
    x, y2 = d.augment_classification(torch.zeros(4, 3, SIDE, SIDE), y, _samples(2, ("mel", "df")), SIDE)
    assert list(pd.Series(y2).value_counts().sort_index().items()) == [("df", 3), ("mel", 3), ("nv", 2)]


def test_augmentation_refuses_nv_unequal_sets_and_rows_that_did_not_run():
    sets = _class_sets()
    with pytest.raises(ValueError, match="NV is never augmented"):
        d.augment_classification(sets.train_x, sets.train_y, _samples(2, (*MINORITY, "nv")), SIDE)
    uneven = _samples(2)
    uneven.images["df"] = uneven.images["df"][:1]
    with pytest.raises(ValueError, match="unequal"):
        d.augment_classification(sets.train_x, sets.train_y, uneven, SIDE)
    with pytest.raises(ValueError, match="did not run"):
        d.augment_classification(sets.train_x, sets.train_y, ClassSamples("G", None, NotRun("absent")), SIDE)


# --------------------------------------------------------------------------- classification tables
def _class_run(dc) -> tuple[ClassificationRun, ClassSets]:
    sets = _class_sets()
    perfect = np.arange(7)
    wrong = np.roll(perfect, 1)
    preds = {}
    for clf in dc.classifiers:
        preds[ORIGINAL, clf] = {"pred test": wrong.copy(), "pred external": np.array([0, 0])}
        preds["Mine-DermPrompt", clf] = {"pred test": perfect.copy(), "pred external": np.array([0, 1])}
    not_run = {r: NotRun(f"{r} absent") for r in d.CLASSIFICATION_ROWS if r != "Mine-DermPrompt"}
    return ClassificationRun(preds, [ORIGINAL, "Mine-DermPrompt"], not_run), sets


def test_classification_tables_have_the_thesis_layout_and_not_run_rows(dc):
    run, sets = _class_run(dc)
    t42 = d.table_4_2(run, sets, dc)
    assert list(t42.columns) == [ORIGINAL, *d.CLASSIFICATION_ROWS]
    assert t42.index.names == ["Metrics", "Classifier"] and len(t42) == 3 * len(dc.classifiers)
    label = d.CLASSIFIER_LABELS[dc.classifiers[0]]
    assert t42.loc[("F1 Score↑", label), "Mine-DermPrompt"] == 1.0
    assert t42.loc[("F1 Score↑", label), ORIGINAL] == 0.0       # every prediction shifted by one class
    assert t42.loc[("Recall↑", label), "PGAN"] == "not run: PGAN absent"
    weighted = d.table_4_2(run, sets, dc, average="weighted")
    shifted = np.array([HAM[i] for i in np.roll(np.arange(7), 1)], dtype=object)
    assert weighted.loc[("F1 Score↑", label), ORIGINAL] == pytest.approx(
        f1_score(sets.test_y, shifted, labels=list(HAM), average="weighted", zero_division=0))
    t43 = d.table_4_3(run, sets, dc)
    assert list(t43.columns) == [c.upper() for c in HAM]
    assert (t43.xs("Augmented", level=1).to_numpy() == 1.0).all()
    t44 = d.table_4_4(run, sets, dc)
    # external: truth [mel, nv]; Mine predicts [mel, nv] (F1 1), Original [mel, mel] (micro over mel/nv: 0.5 ... )
    expected = f1_score(["mel", "nv"], ["mel", "mel"], labels=["mel", "nv"], average="micro")
    assert t44.loc[ORIGINAL, "F1 Score ↑"] == pytest.approx(expected)
    assert t44.loc["Mine-DermPrompt", "F1 Score ↑"] == 1.0
    assert str(t44.loc["DreamBooth", "Recall ↑"]).startswith("not run")


def test_correct_is_per_image_in_classifier_order(dc):
    run, sets = _class_run(dc)
    got = d.correct(run, sets, "Mine-DermPrompt", dc.classifiers)
    assert got.shape == (7 * len(dc.classifiers),) and got.all()
    assert not d.correct(run, sets, ORIGINAL, dc.classifiers).any()


# --------------------------------------------------------------------------- segmentation
def _seg_run(segmenters) -> SegmentationRun:
    rng = np.random.default_rng(0)
    scores = {}
    for scale in SCALE_LABELS:
        for row in (ORIGINAL, "Mine"):
            for k, seg in enumerate(segmenters):
                iou = np.clip(rng.uniform(0.1, 0.9, 5) + (0.05 if row == "Mine" else 0.0), 0, 1)
                scores[scale, row, seg] = {"IoU test": iou, "Dice test": 2 * iou / (1 + iou),
                                           "IoU ph2": iou[:3], "Dice ph2": iou[:3]}
    return SegmentationRun(scores, [ORIGINAL, "Mine"], {r: NotRun("absent") for r in ("Pix2PixHD", "ControlNet",
                                                                                      "Zestguide", "Attn-refocus")},
                           {s: 5 for s in SCALE_LABELS})


def test_segmentation_tables_have_the_thesis_layout(dc):
    run = _seg_run(dc.segmenters)
    t45 = d.table_4_5(run, dc)
    assert t45.index.names == ["Metrics", "Base Dataset", "Segmentation model"]
    assert list(t45.columns) == [ORIGINAL, *d.SEGMENTATION_ROWS] and len(t45) == 2 * 2 * len(dc.segmenters)
    seg = dc.segmenters[0]
    key = ("IoU↑", SCALE_LABELS[1], d.SEGMENTER_LABELS[seg])
    assert t45.loc[key, "Mine"] == pytest.approx(run.scores[SCALE_LABELS[1], "Mine", seg]["IoU test"].mean())
    assert t45.loc[key, "ControlNet"] == "not run: absent"
    t46 = d.table_4_6(run, dc)
    mean = np.mean([run.scores[SCALE_LABELS[1], "Mine", s]["IoU ph2"].mean() for s in dc.segmenters])
    assert t46.loc["Mine", "IoU ↑"] == pytest.approx(mean)
    t47 = d.table_4_7(run, dc)
    assert list(t47.columns) == [d.NO_CA, d.WITH_CA] and str(t47.iloc[0, 0]).startswith("not run")


def test_the_paired_test_pairs_the_same_images_in_the_same_order(dc):
    run = _seg_run(dc.segmenters)
    a = d.pooled(run, SCALE_LABELS[1], "Mine", "Dice test", dc.segmenters)
    b = d.pooled(run, SCALE_LABELS[1], ORIGINAL, "Dice test", dc.segmenters)
    parts = [run.scores[SCALE_LABELS[1], "Mine", s]["Dice test"] for s in dc.segmenters]
    np.testing.assert_array_equal(a, np.concatenate(parts))
    got = d.significance(a, b, "x")
    ref = stats.ttest_rel(a, b)
    assert got["p"] == pytest.approx(ref.pvalue) and got["pairs"] == len(a)
    assert got["mean difference"] == pytest.approx((a - b).mean())
    shuffled = d.significance(a, b[::-1], "x")
    assert shuffled["p"] != pytest.approx(got["p"])  # the pairing matters: a reordered arm is another test


def test_poor_vs_good_splits_at_the_threshold_and_falls_back_to_the_median(dc):
    run = _seg_run(dc.segmenters)
    base = d.pooled(run, SCALE_LABELS[1], ORIGINAL, "IoU test", dc.segmenters)
    gain = d.pooled(run, SCALE_LABELS[1], "Mine", "IoU test", dc.segmenters) - base
    poor, good, note = d.poor_vs_good(run, dc)
    assert poor.tolist() == gain[base < dc.poor_iou].tolist() and good.tolist() == gain[base >= dc.poor_iou].tolist()
    assert "IoU <" in note
    for key in list(run.scores):
        run.scores[key] = {**run.scores[key], "IoU test": run.scores[key]["IoU test"] * 0.1}  # every image poor
    poor, good, note = d.poor_vs_good(run, dc)
    assert len(poor) and len(good) and "median" in note


def test_gain_table_rows_per_segmenter_and_bin(dc):
    run = _seg_run(dc.segmenters)
    g = d.gains(run, dc)
    assert len(g) == len(dc.segmenters) * (len(dc.gain_bins) - 1)
    assert g.groupby("model")["count"].sum().eq(5).all()


def test_rows_that_cannot_run_say_why(cfg, dc):
    sets = SegSets(*(torch.zeros(1),) * 6, "t", torch.zeros(1), torch.zeros(1), "p", "s")
    row = d.trained_mask_to_image("ControlNet", sets, PairSet("Mine", None, None, NotRun("x")), cfg, dc)
    assert not row.ran and "DiDGen" in row.not_run.reason
    only_nv = ClassSets(*(_class_sets().__dict__[k] for k in ("train_x",)), np.array(["nv"] * 14, dtype=object),
                        *list(_class_sets().__dict__.values())[2:])
    row = d.gan_class_samples("PGAN", only_nv, dc, cfg)
    assert not row.ran and "no training image of any minority class" in str(row.not_run)


# --------------------------------------------------------------------------- training on tiny inputs
def test_run_segmentation_trains_every_row_and_scale_on_tiny_data(cfg, dc, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, SIDE, SIDE, generator=g)
    y = torch.zeros(12, SIDE, SIDE, dtype=torch.bool)
    y[:, 8:24, 8:24] = True
    sets = SegSets(x[:6], y[:6], x[6:8], y[6:8], x[8:10], y[8:10], "test", x[10:], y[10:], "PH2", "tiny")
    one = DownstreamConfig(**{**dc.__dict__, "segmenters": ("unet",), "scales": (3, 0)})
    pair_sets = {"Mine": PairSet("Mine", x[:2], y[:2]), "Zestguide": PairSet("Zestguide", None, None, NotRun("no")),
                 d.NO_CA: PairSet(d.NO_CA, x[2:4], y[2:4])}
    settings = TaskSettings("segmentation", ("unet",), SIDE, "mini", FIT)
    run = d.run_segmentation(cfg, sets, pair_sets, one, settings)
    assert run.rows == [ORIGINAL, "Mine", d.NO_CA] and run.sizes == {SCALE_LABELS[0]: 3, SCALE_LABELS[1]: 6}
    assert (SCALE_LABELS[0], d.NO_CA, "unet") not in run.scores  # the ablation runs at the larger scale only
    big = run.scores[SCALE_LABELS[1], "Mine", "unet"]
    assert big["IoU test"].shape == (2,) and big["IoU ph2"].shape == (2,)
    assert "IoU ph2" not in run.scores[SCALE_LABELS[0], "Mine", "unet"]
    again = d.run_segmentation(cfg, sets, pair_sets, one, settings)  # from the content-keyed cache
    np.testing.assert_array_equal(again.scores[SCALE_LABELS[1], "Mine", "unet"]["IoU test"], big["IoU test"])


def test_run_classification_trains_original_and_augmented_sets(cfg, dc):
    sets = _class_sets(1)
    one = DownstreamConfig(**{**dc.__dict__, "classifiers": ("resnet18",)})
    gens = {"Mine-DermPrompt": _samples(1), "PGAN": ClassSamples("PGAN", None, NotRun("absent"))}
    task = TaskSettings("classification", ("resnet18",), SIDE, "", FIT)
    run = d.run_classification(cfg, sets, gens, one, task)
    assert run.rows == [ORIGINAL, "Mine-DermPrompt"] and set(run.not_run) == {"PGAN"}
    p = run.predictions["Mine-DermPrompt", "resnet18"]
    assert p["pred test"].shape == (7,) and p["pred external"].shape == (2,)
    assert set(p["pred test"].tolist()) <= set(range(len(HAM)))


def test_class_batches_mix_instance_and_prior_images_with_dreambooth_weights():
    latents, ids = torch.arange(6.0).view(6, 1, 1, 1), torch.arange(6).view(6, 1)
    prior, prior_ids = torch.full((3, 1, 1, 1), -1.0), torch.tensor([[99]])
    batch = next(d._class_batches(latents, ids, 4, 0, prior, prior_ids, prior_weight=0.5))
    assert batch["latents"].shape[0] == 8 and (batch["latents"][4:] == -1).all()
    assert (batch["input_ids"][4:] == 99).all()
    np.testing.assert_array_equal(batch["input_ids"][:4, 0].numpy(), batch["latents"][:4].flatten().long().numpy())
    torch.testing.assert_close(batch["rec_weight"], torch.tensor([2.0] * 4 + [1.0] * 4))
    plain = next(d._class_batches(latents, ids, 4, 0))
    assert set(plain) == {"latents", "input_ids"}


def test_classification_sets_cap_the_splits_and_report_missing_classes(cfg):
    dc = DownstreamConfig(**{**DownstreamConfig.from_profile(cfg).__dict__, "max_train_images": 5,
                             "max_eval_images": 2})
    sets = d.classification_sets(cfg, dc, SIDE)
    assert len(sets.train_y) <= 5 and len(sets.val_y) <= 2 and len(sets.test_y) <= 2
    assert sets.train_x.shape[1:] == (3, SIDE, SIDE)
    assert 0 <= float(sets.train_x.min()) <= float(sets.train_x.max()) <= 1
    assert set(sets.train_y) <= set(HAM) and set(sets.external_y) <= set(sets.external_labels)
    counts = sets.counts()
    assert list(counts.columns) == list(HAM) and counts.loc["train"].sum() == len(sets.train_y)
    for split in ("train", "val", "test"):
        missing = [c for c in HAM if counts.loc[split, c] == 0]
        assert not missing or any(n.startswith(f"{split} split has no") for n in sets.notes)


def test_capped_splits_keep_every_class_share():
    # 90 NV, 8 MEL, 2 DF capped to 50: stratified shares 45 / 4 / 1 (hand-computed: 50 x 0.9, 0.08, 0.02)
    labels = np.array(["nv"] * 90 + ["mel"] * 8 + ["df"] * 2, dtype=object)
    keep, how = d.capped_indices(labels, 50, seed=0)
    assert how == "a class-stratified" and len(keep) == 50 and list(keep) == sorted(set(keep))
    assert pd.Series(labels[keep]).value_counts().to_dict() == {"nv": 45, "mel": 4, "df": 1}
    assert list(d.capped_indices(labels, 50, seed=0)[0]) == list(keep)          # the seed decides
    # a class with one image cannot be stratified: a plain random draw, said so
    keep, how = d.capped_indices(np.array(["nv"] * 9 + ["df"], dtype=object), 5, seed=0)
    assert how == "a random" and len(keep) == 5


def test_training_free_rows_need_didgen_masks(cfg, dc):
    row = d.training_free_pairs("Zestguide", None, "k", PairSet("Mine", None, None, NotRun("failed")), cfg, dc, 2)
    assert not row.ran and "DiDGen" in row.not_run.reason


def test_classifier_training_is_reproducible_from_an_empty_cache(tmp_path, dc):
    sets = _class_sets(1)
    one = DownstreamConfig(**{**dc.__dict__, "classifiers": ("resnet18",)})
    task = TaskSettings("classification", ("resnet18",), SIDE, "", FitSettings(max_epochs=1, batch_size=4, lr=1e-2,
                                                                             patience=1))
    preds = []
    for k in range(2):
        c = load_profile("smoke", {"paths.cache_root": str(tmp_path / f"cache{k}")})
        torch.manual_seed(100 + k)  # the global generator's state must not matter
        preds.append(d.classifier_predictions(c, "resnet18", sets.train_x, sets.train_y, sets, one, task))
    np.testing.assert_array_equal(preds[0]["pred test"], preds[1]["pred test"])


# --------------------------------------------------------------------------- the chapter
def test_chapter_runs_on_smoke(tmp_path):
    cfg = load_profile("smoke")
    if "downstream" not in cfg or "gan_baselines" not in cfg:  # the harness's and the GAN baselines' sections
        pytest.skip("the downstream harness's or the GAN baselines' profile sections are not in this checkout yet")
    env = {"CTRLGEN_OUTPUT_ROOT": str(tmp_path / "build")}
    result = subprocess.run([sys.executable, "-m", "ctrlgen.cli.main", "run", "ch04_downstream", "--profile", "smoke"],
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
