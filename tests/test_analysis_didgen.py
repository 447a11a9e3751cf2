"""Chapter 4 experiment helpers: IoU of thresholded maps, the blob floor, the segmenter, the model cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrlgen.experiments import ch04_didgen as D
from ctrlgen.config import load_profile


def _disc(side: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def test_otsu_iou_of_a_map_that_is_the_mask_is_one_and_of_its_complement_zero():
    masks = np.stack([_disc(16, 8, 8, 4), _disc(16, 4, 10, 3)])
    maps = torch.from_numpy(masks.astype(np.float32))
    assert np.allclose(D.otsu_iou(maps, masks), 1.0)
    assert np.allclose(D.otsu_iou(1 - maps, masks), 0.0)


def test_blob_baseline_is_the_iou_of_the_thresholded_mean_mask():
    train = np.stack([_disc(8, 4, 4, 2), _disc(8, 4, 4, 2), np.zeros((8, 8), bool)])
    target = np.stack([_disc(8, 4, 4, 2), np.zeros((8, 8), bool) | _disc(8, 0, 0, 1)])
    blob = _disc(8, 4, 4, 2)  # mean 2/3 > 0.5 inside the disc
    expected = [1.0, (blob & target[1]).sum() / (blob | target[1]).sum()]
    assert D.blob_baseline_iou(train, target) == pytest.approx(expected)


def test_segmenter_learns_bright_discs():
    rng = np.random.default_rng(0)
    masks = np.stack([_disc(32, *rng.uniform(10, 22, 2), rng.uniform(4, 9)) for _ in range(48)])
    images = np.where(masks[..., None], 220, 40).astype(np.uint8).repeat(3, -1)
    seg = D.train_segmenter(images[:40], masks[:40], steps=120, batch_size=8, lr=5e-3, channels=(8, 16, 32), seed=0)
    from ctrlgen.metrics.overlap import iou as mask_iou

    iou = mask_iou(seg.predict(D.pixels01(images[40:])), masks[40:])
    assert iou.mean() > 0.8 and seg.history[-1] < seg.history[0]


def test_first_pairs_keeps_every_field_aligned():
    from ctrlgen.methods.didgen import PairResult

    n = 5
    r = PairResult(torch.rand(n, 3, 8, 8), torch.rand(n, 8, 8) > 0.5, torch.rand(n, 8, 8) > 0.5, torch.rand(n, 8, 8) > 0.5,
                   torch.tensor([True, False, True, True, False]), torch.zeros(n, dtype=torch.bool), list("abcde"),
                   list("vwxyz"), [f"p{i}" for i in range(n)], torch.rand(n, 4, 4), torch.rand(n, 8, 8))
    head = D.first_pairs(D.PairRun("x", r, 0.5), 3, "first").result
    assert head.prompts == ["p0", "p1", "p2"] and head.failure == list("abc") and torch.equal(head.images, r.images[:3])
    assert head.ok.tolist() == [True, False, True] and len(head.a_cs) == 3


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="unknown chapter-4 model"):
        D.finetune(load_profile("smoke"), "gan", None)
