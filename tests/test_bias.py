"""Bias identification (thesis §5.3.2, §5.4.2): attributes, poorly segmented subsets, the statistical tests against
hand-computed references, and the planted-bias recovery on the procedural dermoscopy world."""
import itertools

import numpy as np
import pytest
from scipy import stats

from ctrlgen.analysis.bias import (
    ShiftSettings,
    annotate,
    chi2_groups,
    histogram_grid,
    ks_test,
    permutation_mean_test,
    poor_subsets,
    poor_vs_rest,
    shift_table,
)
from ctrlgen.data.attributes import circularity
from ctrlgen.data.worlds.dermoscopy import generate_dermoscopy


def test_circularity_of_a_disk_and_a_square():
    yy, xx = np.mgrid[:128, :128]
    disk = (yy - 63.5) ** 2 + (xx - 63.5) ** 2 < 40 ** 2
    square = np.zeros((128, 128), bool)
    square[24:104, 24:104] = True
    assert circularity(disk)[0] == pytest.approx(1.0, abs=0.03)
    # the perimeter is the 4-direction Crofton estimate (data.attributes): π × mean projected width over 0°, 45°, 90°,
    # 135° = π a (2 + 2√2) / 4 for an axis-aligned square, so 4πS/P² = 16 / (π (1 + √2)²) = 0.874, not the true π/4
    crofton_square = 16 / (np.pi * (1 + np.sqrt(2)) ** 2)
    assert circularity(square)[0] == pytest.approx(crofton_square, abs=0.01)
    assert circularity(square)[0] < circularity(disk)[0]


def test_poor_subsets_are_strict_thresholds():
    s = poor_subsets(np.array([0.3, 0.6, 0.79, 0.8, 0.95]), (0.8, 0.6, 0.4))
    assert s["S_0.8"].tolist() == [True, True, True, False, False]
    assert s["S_0.6"].tolist() == [True, False, False, False, False]
    assert s["S_0.4"].tolist() == [True, False, False, False, False]


def test_poor_vs_rest_splits_at_the_threshold_when_both_arms_have_images():
    values, ious = np.array([10.0, 20.0, 30.0, 40.0]), np.array([0.1, 0.9, 0.3, 0.7])
    poor, rest, note = poor_vs_rest(values, ious, 0.6)
    assert poor.tolist() == [10.0, 30.0] and rest.tolist() == [20.0, 40.0]
    assert "< 0.6" in note and "median" not in note
    poor, rest, _ = poor_vs_rest(values, ious, 0.7)  # strict: IoU 0.7 is not below 0.7
    assert poor.tolist() == [10.0, 30.0]


def test_poor_vs_rest_falls_back_to_the_median_when_an_arm_is_empty():
    values = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    # every IoU below 0.6: median 0.3, poor = IoU < 0.3 = {0.1, 0.2}
    poor, rest, note = poor_vs_rest(values, np.array([0.3, 0.1, 0.5, 0.2, 0.4]), 0.6)
    assert poor.tolist() == [20.0, 40.0] and rest.tolist() == [10.0, 30.0, 50.0] and "< median" in note
    # every IoU at or above 0.6 (the other empty arm): median 0.8, poor = {0.6, 0.7}
    poor, rest, note = poor_vs_rest(values, np.array([0.9, 0.6, 0.8, 0.7, 1.0]), 0.6)
    assert poor.tolist() == [20.0, 40.0] and rest.tolist() == [10.0, 30.0, 50.0] and "median IoU 0.8" in note


def test_poor_vs_rest_keeps_ties_at_the_median_together():
    # IoUs 0, 0, 0, 0.5: median 0, nothing below it; the three images at 0 are the poor arm (not two of them)
    poor, rest, note = poor_vs_rest(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 0.5, 0.0, 0.0]), 0.6)
    assert poor.tolist() == [1.0, 3.0, 4.0] and rest.tolist() == [2.0] and "≤ median" in note


def test_poor_vs_rest_ranks_when_every_iou_ties_and_drops_non_finite_pairs():
    # every IoU 0 (a smoke segmenter after one epoch): neither threshold nor median splits; the lower half by rank
    # (input order among ties) does; the NaN value and the NaN IoU are left out first
    values = np.array([4.0, 3.0, np.nan, 2.0, 1.0, 7.0])
    ious = np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.nan])
    poor, rest, note = poor_vs_rest(values, ious, 0.6)
    assert poor.tolist() == [4.0, 3.0] and rest.tolist() == [2.0, 1.0] and "rank" in note
    poor, rest, _ = poor_vs_rest(np.array([5.0]), np.array([0.2]), 0.6)  # one image: one arm must be empty
    assert poor.tolist() == [5.0] and rest.tolist() == []
    with pytest.raises(ValueError, match="one length"):
        poor_vs_rest(np.zeros(3), np.zeros(2), 0.6)


def test_ks_statistic_by_hand():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.5, 4.0, 5.0, 6.0])
    grid = np.concatenate([a, b])
    by_hand = max(abs(np.mean(a <= x) - np.mean(b <= x)) for x in grid)
    stat, p = ks_test(a, np.append(b, np.nan))  # NaNs (empty-region attributes) are dropped
    assert stat == pytest.approx(by_hand) == pytest.approx(3 / 4)
    assert p == pytest.approx(stats.ks_2samp(a, b).pvalue)


def test_permutation_test_matches_exhaustive_enumeration():
    a, b = np.array([4.0, 5.0, 7.0]), np.array([1.0, 2.0, 2.5, 3.0])
    pooled = np.concatenate([a, b])
    observed = a.mean() - b.mean()
    diffs = []
    for idx in itertools.combinations(range(7), 3):
        mask = np.zeros(7, bool)
        mask[list(idx)] = True
        diffs.append(pooled[mask].mean() - pooled[~mask].mean())
    diffs = np.asarray(diffs)
    # two-sided as scipy defines it: twice the smaller one-sided exact p over the 35 splits; here a holds the three
    # largest values, so only its own split reaches the observed difference: p = 2/35
    exact = min(1.0, 2 * min(np.mean(diffs >= observed - 1e-12), np.mean(diffs <= observed + 1e-12)))
    assert exact == pytest.approx(2 / 35)
    stat, p = permutation_mean_test(a, b, n_resamples=9999, seed=0)
    assert stat == pytest.approx(observed)
    assert p == pytest.approx(exact)
    # a one-image subset (a tiny external set): the difference of means, no p-value (scipy needs two per sample)
    stat, p = permutation_mean_test(np.array([5.0]), np.array([1.0, 2.0, 3.0]))
    assert stat == pytest.approx(3.0) and np.isnan(p)


def test_chi2_of_group_counts_by_hand():
    sub = ["I-II"] * 8 + ["V-VI"] * 2
    rest = ["I-II"] * 10 + ["V-VI"] * 10
    table = np.array([[8, 2], [10, 10]])
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    # Yates' correction (2x2): (|O − E| − 0.5)² / E
    by_hand = (((np.abs(table - expected) - 0.5) ** 2) / expected).sum()
    stat, p = chi2_groups(sub, rest)
    assert stat == pytest.approx(by_hand)
    assert 0 < p < 1


def test_annotate_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="differ in number or size"):
        annotate(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 9), bool))
    with pytest.raises(ValueError, match="skin-tone labels"):
        annotate(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8), bool), skin_tone=["I-II"])


def test_planted_low_contrast_bias_is_recovered_and_skin_tone_is_not_blamed():
    """Procedural scenes whose segmentation quality is planted to depend on lesion–skin contrast only (IoU low where
    the true ITA Difference < 30): the analysis, measuring attributes from the images, must single out ITA
    Difference in S_0.6 with a small p-value and the largest standardised shift, and must not flag skin tone."""
    scenes = generate_dermoscopy(160, seed=3, overrides=None)
    rng = np.random.default_rng(0)
    low = scenes.truth["ita_difference"].to_numpy() < 30
    iou = np.where(low, rng.uniform(0.2, 0.7, len(low)), rng.uniform(0.75, 0.95, len(low)))
    attrs = annotate(scenes.images, scenes.masks)
    table = shift_table(attrs, {"planted": iou}, ShiftSettings(thresholds=(0.6,), n_resamples=999, seed=0))
    s06 = table.loc[("planted", "S_0.6")]
    assert s06.loc["ITA Difference", "p (KS / chi2)"] < 1e-4
    assert s06.loc["ITA Difference", "p (permutation, mean)"] < 0.01
    assert s06.loc["ITA Difference", "standardised shift"] < 0
    shifts = s06["standardised shift"].drop("Skin tone").abs()
    assert shifts.idxmax() == "ITA Difference"
    assert s06.loc["Skin tone", "p (KS / chi2)"] > 0.01
    fig = histogram_grid(attrs, {"planted": iou}, (0.8, 0.6))
    assert len(fig.axes) == 6
