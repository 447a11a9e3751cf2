"""IoU / Dice / thresholded Jaccard against hand-computed cases, scikit-learn and torchmetrics."""
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score
from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index

from ctrlgen.metrics import overlap as O


def _masks():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[0, :2, :2] = True          # 4 px
    b[0, :2, :3] = True          # 6 px; overlap 4, union 6
    a[1, 0, 0] = True            # disjoint: 0
    b[1, 3, 3] = True
    # image 2: both empty
    b[3, :, :] = True            # prediction empty, target full
    return a, b


def test_hand_computed_iou_and_dice():
    a, b = _masks()
    np.testing.assert_allclose(O.iou(a, b), [4 / 6, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(O.dice(a, b), [2 * 4 / 10, 0.0, 1.0, 0.0])
    # thresholded Jaccard: 4/6 >= 0.65 kept, the rest as they are -> (0.6667 + 0 + 1 + 0) / 4
    assert O.thresholded_jaccard(a, b) == pytest.approx((4 / 6 + 1.0) / 4)
    # an IoU of 0.6 (3 of 5) is a failure under the ISIC cutoff
    p, g = np.zeros((1, 1, 5), bool), np.zeros((1, 1, 5), bool)
    p[0, 0, :3], g[0, 0, :] = True, True
    assert O.iou(p, g)[0] == pytest.approx(0.6) and O.thresholded_jaccard(p, g) == 0.0
    summary = O.overlap_summary(a, b)
    assert summary["IoU"] == pytest.approx(np.mean([4 / 6, 0, 1, 0])) and summary["images"] == 4


def test_probability_maps_need_an_explicit_threshold():
    prob = np.array([[[0.2, 0.9], [0.6, 0.0]]])
    target = np.array([[[0, 1], [0, 0]]], np.uint8)
    with pytest.raises(ValueError, match=r"values other than 0 and 1 \(e.g. 0.2\).*threshold="):
        O.iou(prob, target)
    assert O.iou(prob, target, threshold=0.5)[0] == pytest.approx(1 / 2)   # {0.9, 0.6} vs {0.9}
    assert O.iou(prob, target, threshold=0.7)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="already boolean"):
        O.iou(prob > 0.5, target, threshold=0.5)
    with pytest.raises(ValueError, match="target"):
        O.dice(prob > 0.5, target * 255)  # a 0/255 target is not silently binary
    # 0/1 numbers (a float or int tensor of a binary mask) are binary as they are
    assert O.iou(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1, 0]]]))[0] == 1.0


def test_shapes_are_checked():
    one = np.zeros((8, 8), bool)
    one[2:4, 2:4] = True
    with pytest.raises(ValueError, match=r"batch \(N, H, W\); got shape \(8, 8\).*mask\[None\]"):
        O.iou(one, one)
    assert O.iou(one[None], one[None]).shape == (1,)
    with pytest.raises(ValueError, match=r"shapes differ: \(1, 8, 8\) vs \(1, 4, 4\)"):
        O.dice(one[None], np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="empty batch"):
        O.iou(np.zeros((0, 8, 8), bool), np.zeros((0, 8, 8), bool))


def test_against_sklearn_and_torchmetrics_on_random_masks():
    rng = np.random.default_rng(0)
    prob = rng.random((12, 16, 16))
    target = rng.random((12, 16, 16)) < 0.3
    target[3] = False  # one empty target
    prob[3] = 0.1      # ... and an empty prediction for it (both empty)
    ours_iou, ours_dice = O.iou(prob, target, threshold=0.5), O.dice(prob, target, threshold=0.5)
    for i in range(12):
        y, p = target[i].ravel(), prob[i].ravel() > 0.5
        assert ours_iou[i] == pytest.approx(jaccard_score(y, p, zero_division=1.0))
        assert ours_dice[i] == pytest.approx(f1_score(y, p, zero_division=1.0))
        if i != 3:  # torchmetrics' convention for two empty masks differs (0); ours is documented as 1
            t_prob, t_target = torch.tensor(prob[i]), torch.tensor(target[i]).long()
            assert ours_iou[i] == pytest.approx(binary_jaccard_index(t_prob, t_target, threshold=0.5).item(), abs=1e-6)
            assert ours_dice[i] == pytest.approx(binary_f1_score(t_prob, t_target, threshold=0.5).item(), abs=1e-6)
    assert ours_iou[3] == 1.0 and ours_dice[3] == 1.0
