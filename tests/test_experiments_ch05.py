"""Chapter 5's experiment module: settings from the profile, the procedural tone data, Table 5.1 assembly, the
low-contrast selection and its bad input, Tables 5.2-5.4 and Fig. 5.10's numbers by hand, the claims' pooling, the
skin-tone base models through the downstream harness, and the baselines' bad input."""
import numpy as np
import pytest

from ctrlgen.methods.dual_branch import style_targets
import torch

from ctrlgen.config import load_profile
from ctrlgen.experiments import ch05_lowcontrast as ch05
from ctrlgen.data.worlds.dermoscopy import generate_dermoscopy
from ctrlgen.downstream.train import FitSettings
from ctrlgen.methods.skin_tone import BASE_MODELS
from ctrlgen.thesis import thesis_frame


@pytest.fixture(scope="module")
def cc():
    return ch05.Ch05Config.from_profile(load_profile("smoke"))


def test_settings_from_every_profile():
    for name in ("smoke", "mini", "full"):
        c = ch05.Ch05Config.from_profile(load_profile(name))
        assert set(c.segmenters) == set(ch05.SEGMENTER_NAMES)
        assert c.low_contrast_threshold == 30.0 and c.thresholds == (0.8, 0.6)
    full = ch05.Ch05Config.from_profile(load_profile("full"))
    assert (full.tone_fit.lr, full.tone_fit.batch_size, full.tone_fit.patience) == (1e-3, 64, 10)  # §5.4.1
    assert (full.seg_fit.lr, full.seg_fit.batch_size, full.seg_fit.patience) == (1e-3, 24, 20)     # §5.4.2
    assert (full.finetune_fit.lr, full.finetune_fit.batch_size) == (1e-4, 24)                       # §5.5.1


def test_tone_data_has_a_balanced_test_set(cc):
    tone = ch05.tone_data(cc)
    assert len(tone.test_y) == 3 * cc.tone_test_per_group
    assert len(tone.val_y) + len(tone.train_y) == cc.tone_train_images
    assert set(np.unique(tone.test_y)) <= {0, 1, 2}
    assert "Fitzpatrick17k" in tone.note and "DDI" in tone.note


def test_table_5_1_rows_match_the_thesis_table(cc):
    tone = ch05.tone_data(cc)
    rng = np.random.default_rng(0)

    def fake(y):  # a base model that is right 80% of the time
        p = np.full((len(y), 3), 0.1)
        right = rng.uniform(size=len(y)) < 0.8
        p[np.arange(len(y)), np.where(right, y, (y + 1) % 3)] = 0.8
        return p
    preds = {n: {"val": fake(tone.val_y), "test": fake(tone.test_y), "extra": fake(np.zeros(5, int)),
                 "history": np.zeros((1, 3))} for n in BASE_MODELS}
    res = ch05.table_5_1(cc, tone, preds)
    assert set(res.table.index) == set(thesis_frame("5.1").index)
    assert list(res.table.columns) == list(thesis_frame("5.1").columns)
    assert len(res.extra_groups) == 5
    assert res.per_image_correct["Logistic Regression"].shape == tone.test_y.shape


def test_low_contrast_subset_selects_by_ita_difference_and_stands_in_for_an_empty_one():
    scenes = generate_dermoscopy(24, seed=1, overrides={"ita_difference": np.r_[np.full(8, 10.0), np.full(16, 60.0)]})
    index = ch05.low_contrast_subset(scenes.images, scenes.masks, 30.0)
    assert set(index) == set(range(8))
    # none below 30 (a small real set, e.g. smoke's 13 ISIC images): the lowest-contrast ones stand in
    stand_in = ch05.low_contrast_subset(scenes.images[8:], scenes.masks[8:], 30.0, max_count=3)
    assert len(stand_in) == 3 and set(stand_in) <= set(range(16))


def test_random_control_has_the_target_size():
    idx = ch05.random_subset(50, 12, seed=0)
    assert len(idx) == 12 == len(set(idx)) and idx.max() < 50


def test_mitigation_table_by_hand():
    per_source = {"dcsau_net": {"Pretrained": {"iou": np.array([0.2, 0.5, 0.9]), "dice": np.array([0.3, 0.6, 0.95])},
                                "Training Sample (Target)": {"iou": np.array([0.4, 0.7, 0.8]), "dice": np.array([0.5, 0.8, 0.9])}}}
    s06 = {"dcsau_net": np.array([True, True, False])}
    t = ch05.mitigation_table(per_source, s06)
    assert t.loc[("DCSAU-Net", "Training Sample (Target)"), ("Poorly segmented samples S_{0.6}", "IoU ↑")] == pytest.approx(0.55)
    assert t.loc[("DCSAU-Net", "Pretrained"), ("All samples", "Dice ↑")] == pytest.approx((0.3 + 0.6 + 0.95) / 3)
    assert set(t.columns) == set(thesis_frame("5.3").columns)


def test_every_generative_source_runs():
    assert ch05.not_run_reasons() == {}
    assert set(ch05.BASELINES) | {"Mine", "Pretrained", "Training Sample (Random)", "Training Sample (Target)"} == set(ch05.SOURCES)


def test_generation_ratios_must_include_one():
    assert ch05._ratios([1, 4]) == (1, 4)
    for bad in ([2, 4], [], [0, 1]):
        with pytest.raises(ValueError, match="generation_ratios"):
            ch05._ratios(bad)


def test_base_model_learns_a_colour_rule_through_the_downstream_harness():
    # three groups = three skin colours: ResNet-18 via build_classifier/train_classifier must separate them, keep
    # its best validation macro-F1 epoch and return softmax probabilities
    rng = np.random.default_rng(1)
    colours = np.array([[230, 200, 180], [170, 120, 90], [80, 50, 35]], np.uint8)
    y = np.repeat([0, 1, 2], 8)
    x = np.clip(colours[y][:, None, None, :] + rng.integers(-8, 8, (24, 32, 32, 3)), 0, 255).astype(np.uint8)
    tone = ch05.ToneData(x, y, x, y, x, y, "")
    fit = FitSettings(max_epochs=8, batch_size=8, lr=1e-3, patience=3, seed=0, augment=False)
    out = ch05._base_predictions("resnet18", tone, x[:3], 32, fit, None)
    assert out["test"].shape == (24, 3) and np.allclose(out["test"].sum(1), 1, atol=1e-5)
    assert (out["test"].argmax(1) == y).mean() >= 0.9
    best = int(out["best_epoch"])
    assert out["history"][best, 2] == out["history"][:, 2].max()


def test_table_5_4_by_hand():
    ext = {"fat_net": {"Pretrained": {"iou": np.array([0.2, 0.5, 0.9, 0.3]), "dice": np.array([0.3, 0.6, 0.95, 0.4])},
                       "Mine": {"iou": np.array([0.4, 0.7, 0.8, 0.5]), "dice": np.array([0.5, 0.8, 0.9, 0.6])}}}
    pre = ext["fat_net"]["Pretrained"]["iou"]
    subsets = {"S_{0.4}": {"fat_net": pre < 0.4}, "S_{0.6}": {"fat_net": pre < 0.6}}
    t = ch05.table_5_4(ext, subsets)
    assert t.loc[("FAT-Net", "Mine"), ("Poorly segmented samples S_{0.4}", "IoU ↑")] == pytest.approx(0.45)
    assert t.loc[("FAT-Net", "Mine"), ("Poorly segmented samples S_{0.6}", "Dice ↑")] == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    assert t.loc[("FAT-Net", "Pretrained"), ("All samples", "IoU ↑")] == pytest.approx(0.475)
    assert list(t.columns) == list(thesis_frame("5.4").columns)


def test_pooled_claim_values_are_paired_and_fall_back_to_all_images():
    per = {"a": {"Mine": {"iou": np.array([1.0, 2.0])}, "Pretrained": {"iou": np.array([3.0, 4.0])}},
           "b": {"Mine": {"iou": np.array([5.0, 6.0])}, "Pretrained": {"iou": np.array([7.0, 8.0])}}}
    values, note = ch05.pooled(per, ["Mine", "Pretrained"], {"a": np.array([True, False]), "b": np.array([False, True])})
    assert values["Mine"].tolist() == [1.0, 6.0] and values["Pretrained"].tolist() == [3.0, 8.0] and note == "subset images"
    values, note = ch05.pooled(per, ["Mine"], {"a": np.zeros(2, bool), "b": np.zeros(2, bool)})
    assert values["Mine"].tolist() == [1.0, 2.0, 5.0, 6.0] and "empty" in note


def test_ratio_table_by_hand():
    s06 = np.array([True, False, True])
    t = ch05.ratio_table({4: {"iou": np.array([0.4, 0.6, 0.2]), "pairs": 12}, 1: {"iou": np.array([0.3, 0.9, 0.1]), "pairs": 3}},
                         s06)
    assert t.index.tolist() == [1, 4]
    assert t.loc[1, "IoU (S_0.6)"] == pytest.approx(0.2) and t.loc[4, "IoU (All)"] == pytest.approx(0.4)
    assert t.loc[4, "pairs"] == 12


class _Features(torch.nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def test_image_quality_by_hand():
    # identical images: LPIPS-form distance 0 and cosine similarity 1; a uniformly brighter copy: similarity 1 still
    # (same direction), a positive distance; mismatched lengths are refused
    ref = np.random.default_rng(0).integers(0, 200, (3, 8, 8, 3)).astype(np.uint8)
    dist = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)  # noqa: E731
    q = ch05.QualityFeatures(_Features(), dist, _Features(), "test")
    out = ch05.image_quality({"Mine": ref, "brighter": ref + 40}, ref, q)
    assert out["lpips"]["Mine"] == pytest.approx(np.zeros(3), abs=1e-7)
    assert out["dino"]["Mine"] == pytest.approx(np.ones(3), abs=1e-6)
    assert (out["lpips"]["brighter"] > 0).all()
    assert list(out["table"].columns) == list(thesis_frame("5.2").columns)
    with pytest.raises(ValueError, match="2 images for 3 references"):
        ch05.image_quality({"Mine": ref[:2]}, ref, q)


def test_baseline_pairs_refuse_unknown_kinds_and_mismatched_references(cc):
    mine = ch05.DualBranchPairs(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8), bool), np.arange(2), 2, {}, "")
    with pytest.raises(ValueError, match="unknown baseline"):
        ch05.baseline_pairs(load_profile("smoke"), cc, "Pix2PixHD", None, "", None, "", mine, mine.images)
    with pytest.raises(ValueError, match="needs ip"):
        ch05.baseline_pairs(load_profile("smoke"), cc, "IP-Adapter", None, "", None, "", mine, mine.images)
    with pytest.raises(ValueError, match="1 style references for 2"):
        ch05.baseline_pairs(load_profile("smoke"), cc, "ControlNet", None, "", None, "", mine, mine.images[:1])


def test_settings_are_the_harness_with_chapter_5_overrides():
    """§5.4.2's batch 24 and the §5.4.1 base models' Adam come from ch05's sections; what ch05 does not set (the
    segmenters' lr, optimizer, size) follows downstream.segmentation, so an override of it reaches chapter 5."""
    cfg = load_profile("full")
    c = ch05.Ch05Config.from_profile(cfg)
    assert (c.seg_fit.batch_size, c.seg_fit.lr, c.seg_fit.patience, c.segmenter_size) == (24, 1e-3, 20, "full")
    assert (c.tone_fit.batch_size, c.tone_fit.lr, c.tone_fit.patience, c.tone_fit.optimizer) == (64, 1e-3, 10, "adam")
    assert (c.finetune_fit.batch_size, c.finetune_fit.lr) == (24, 1e-4)  # §5.5.1
    assert c.segmenters == ("attention_unet", "dcsau_net", "fat_net")
    moved = ch05.Ch05Config.from_profile(load_profile("full", {"downstream.segmentation.lr": 0.01,
                                                               "downstream.segmentation.batch_size": 7}))
    assert (moved.seg_fit.lr, moved.finetune_fit.lr, moved.seg_fit.batch_size) == (0.01, 1e-4, 24)


def test_dual_branch_targets_refuse_an_empty_low_contrast_subset_without_a_fallback():
    scenes = generate_dermoscopy(6, seed=2, overrides={"ita_difference": np.full(6, 70.0)})
    with pytest.raises(ValueError, match="low-contrast subset is empty"):
        style_targets(scenes.images, scenes.masks, 30.0)


def test_to_unit_for_figures():
    x = ch05.to_unit(np.full((2, 4, 4, 3), 255, np.uint8))
    assert x.shape == (2, 3, 4, 4) and float(x.max()) == 1.0
    assert ch05.to_unit(np.ones((2, 4, 4), bool)).shape == (2, 4, 4)


def test_low_contrast_subset_is_lowest_first_and_capped():
    diffs = np.array([25.0, 5.0, 60.0, 15.0, 70.0, 28.0])
    scenes = generate_dermoscopy(6, seed=4, overrides={"ita_difference": diffs})
    full = ch05.low_contrast_subset(scenes.images, scenes.masks, 30.0)
    assert sorted(full.tolist()) == [0, 1, 3, 5]
    measured = ch05.annotate(scenes.images, scenes.masks)["ita_difference"].to_numpy()
    assert np.all(np.diff(measured[full]) >= 0)          # lowest contrast first
    assert ch05.low_contrast_subset(scenes.images, scenes.masks, 30.0, max_count=2).tolist() == full[:2].tolist()


def test_table_5_5_by_hand():
    s06 = {"fat_net": np.array([True, False, True])}
    t = ch05.table_5_5({"w/o layout guidance": 0.2, "w/ layout guidance (mine)": 0.4},
                       {"w/o layout guidance": {"fat_net": np.array([0.1, 0.9, 0.3])},
                        "w/ layout guidance (mine)": {"fat_net": np.array([0.5, 0.8, 0.7])}}, s06)
    assert t.loc["w/ layout guidance (mine)", ("FAT-Net", "IoU (S_{0.6} ↑)")] == pytest.approx(0.6)
    assert t.loc["w/o layout guidance", ("FAT-Net", "IoU (All ↑)")] == pytest.approx(1.3 / 3)
    assert t.loc["w/o layout guidance", ("Diversity ↑", "")] == 0.2
    assert set(t.columns) <= set(thesis_frame("5.5").columns) and set(t.index) == set(thesis_frame("5.5").index)
