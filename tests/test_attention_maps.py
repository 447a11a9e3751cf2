"""Map operations and guidance/training losses against hand-computed cases, numpy loops and scikit-image."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu
from skimage.morphology import dilation, disk, erosion

from ctrlgen.attention import maps as M
from ctrlgen.guidance import cross_attention_layout_loss, self_attention_layout_loss, style_loss
from ctrlgen.training import attention_alignment_loss, reconstruction_loss, self_attention_structure_loss


def rand_self_attention(n: int, b: int = 1, seed: int = 0, sharp: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(b, n, n, generator=g, dtype=torch.float64), dim=-1)


def test_otsu_separates_a_two_level_map_by_hand():
    """Hand case: 60 pixels at 0.1 and 40 at 0.9 — any Otsu threshold lies in [0.1, 0.9) and selects the 0.9s."""
    x = torch.tensor([0.1] * 60 + [0.9] * 40).reshape(10, 10)
    t = M.otsu_threshold(x)
    assert 0.1 <= t < 0.9
    assert M.otsu_mask(x, dilate=0, erode=0).sum().item() == 40
    assert M.otsu_threshold(np.full((4, 4), 0.5)) == 0.5  # constant map: no threshold, the constant


def test_otsu_tensor_and_array_agree():
    x = np.random.default_rng(0).random((16, 16)) ** 3
    assert M.otsu_threshold(torch.from_numpy(x)) == M.otsu_threshold(x) == pytest.approx(float(threshold_otsu(x)))


def test_otsu_mask_matches_skimage_pipeline():
    rng = np.random.default_rng(1)
    a = rng.random((16, 16)) * 0.3
    a[4:11, 3:12] += 0.6
    a[7, 7] = 0.0  # a hole that dilation-then-erosion fills
    ref = a > threshold_otsu(a)
    ref = erosion(dilation(ref, disk(1)), disk(1))
    got = M.otsu_mask(torch.from_numpy(a)[None], dilate=1, erode=1)[0].numpy()
    assert (got == ref).all() and got[7, 7]


def test_gaussian_smooth_impulse_gives_kernel():
    x = torch.zeros(1, 7, 7)
    x[0, 3, 3] = 1.0
    out = M.gaussian_smooth(x, 3, 0.5)[0]
    w = [math.exp(-(d * d) / (2 * 0.25)) for d in (-1, 0, 1)]
    z = sum(w) ** 2
    for i, di in enumerate((-1, 0, 1)):
        for j, dj in enumerate((-1, 0, 1)):
            assert out[3 + di, 3 + dj].item() == pytest.approx(w[i] * w[j] / z, rel=1e-6)
    assert out.sum().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(M.gaussian_smooth(torch.full((2, 5, 5), 0.3)), torch.full((2, 5, 5), 0.3))


def test_text_token_softmax():
    a = torch.rand(2, 3, 3, 10)
    out = M.text_token_softmax(a, last=5, scale=100.0)
    e = torch.exp(100 * (a[..., 1:5].double() - a[..., 1:5].double().amax(-1, keepdim=True)))
    ref = (e / e.sum(-1, keepdim=True)).float()
    assert torch.allclose(out[..., 1:5], ref, atol=1e-6)
    assert (out[..., 0] == 0).all() and (out[..., 5:] == 0).all()


def test_suppress_and_self_enhance_by_hand():
    a = torch.tensor([[0.5, 0.25], [0.0, 1.0]])
    assert torch.allclose(M.suppress(a, 2), a**2)
    s = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.9, 0.1], [0.0, 0.0, 0.1, 0.9]])
    out = M.self_enhance(a, s, tau=2, power="elementwise")
    flat = a.flatten()
    expect = torch.stack([sum(s[p, q] ** 2 * flat[q] for q in range(4)) for p in range(4)]).reshape(2, 2)
    assert torch.allclose(out, expect)
    # identity self-attention leaves the map unchanged, for any τ and concept stack
    stack = torch.rand(3, 2, 2)
    assert torch.allclose(M.self_enhance(stack, torch.eye(4), tau=4), stack)


def test_cross_self_map_matrix_power():
    s = rand_self_attention(16, b=2)
    a = torch.rand(2, 4, 4, dtype=torch.float64)
    assert torch.allclose(M.cross_self_map(a, s, tau=0), a)
    ref = (s @ s @ s @ s @ a.reshape(2, 16, 1)).reshape(2, 4, 4)
    assert torch.allclose(M.cross_self_map(a, s, tau=4), ref)


def test_delta_mask_by_hand():
    a1 = torch.tensor([[1.0, 0.5], [0.0, 0.2]])
    a2 = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    m = M.delta_mask(torch.stack([a1, a2]), gamma=0.1, normalize=False)
    assert m[0].tolist() == [[True, False], [False, False]]
    assert m[1].tolist() == [[False, False], [True, False]]
    # three concepts: max vs min over the others
    a3 = torch.tensor([[0.95, 0.0], [0.0, 0.0]])
    mx = M.delta_mask(torch.stack([a1, a2, a3]), gamma=0.1, normalize=False, reduce="max")
    mn = M.delta_mask(torch.stack([a1, a2, a3]), gamma=0.1, normalize=False, reduce="min")
    assert mx[0, 0, 0] and not mn[0, 0, 0]


def test_topk_and_attention_score():
    rng = np.random.default_rng(0)
    maps = [torch.from_numpy(rng.random((2, 8, 8))) for _ in range(5)]
    mask = torch.from_numpy(rng.random((2, 8, 8)) > 0.5)
    got = M.attention_score(maps, mask, n=5)
    ref = np.mean([[np.sort((m[i] * mask[i]).numpy().ravel())[-5:].mean() for i in range(2)] for m in maps], axis=0)
    assert np.allclose(got.numpy(), ref)


def test_affinity_ratio():
    lab = torch.zeros(4, 4, dtype=torch.long)
    lab[:, :1] = 1  # a quarter of the pixels
    n = 16
    uniform = torch.full((n, n), 1.0 / n)
    assert M.affinity_ratio(uniform, lab).item() == pytest.approx(1.0)
    flat = lab.flatten()
    same = (flat[:, None] == flat[None, :]).double()
    perfect = same / same.sum(-1, keepdim=True)
    assert M.affinity_ratio(perfect, lab).item() == pytest.approx(2.0)
    s = rand_self_attention(n)[0]
    ref = np.mean([s[p, flat == flat[p]].sum().item() / (flat == flat[p]).double().mean().item() for p in range(n)])
    assert M.affinity_ratio(s, lab).item() == pytest.approx(ref)
    assert M.diagonal_mass(uniform).item() == pytest.approx(1 / n)


def test_layout_losses_by_hand():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1
    perfect = mask / mask.sum()
    assert cross_attention_layout_loss(perfect, mask).item() == pytest.approx(1 - 1 / 4)
    ones = torch.ones(1, 4, 4)
    assert cross_attention_layout_loss(ones * mask, mask).item() == pytest.approx(0.0)
    assert cross_attention_layout_loss(ones, mask).item() == pytest.approx(1.0)
    s = rand_self_attention(16)
    m = mask.flatten().double()
    total = sum(m[p] * sum(s[0, p, q] * (1 - m[q]) for q in range(16)) for p in range(16))
    assert self_attention_layout_loss(s, mask).item() == pytest.approx((total / (1 - m).sum()).item())
    assert self_attention_layout_loss(s, mask, "queries").item() == pytest.approx((total / m.sum()).item())


def test_style_loss_by_hand():
    z = torch.randn(2, 4, 8, 8)
    assert style_loss(z, z).item() == pytest.approx(0.0, abs=1e-10)
    shifted = z + torch.tensor([1.0, 0, 0, 2.0])[None, :, None, None]
    assert style_loss(shifted, z).item() == pytest.approx(5.0, rel=1e-5)
    assert style_loss(2 * z, z).item() == pytest.approx((z.std((-2, -1)) ** 2).sum(-1).mean().item() + 
                                                         (z.mean((-2, -1)) ** 2).sum(-1).mean().item(), rel=1e-5)


def test_attention_alignment_loss_reference():
    rng = torch.Generator().manual_seed(0)
    cross = {4: torch.softmax(torch.randn(2, 4, 4, 6, generator=rng), -1), 2: torch.softmax(torch.randn(2, 2, 2, 6, generator=rng), -1)}
    idx = torch.tensor([[1, 2], [3, 4]])
    masks = (torch.rand(2, 2, 8, 8, generator=rng) > 0.5).float()
    valid = torch.tensor([[True, True], [True, False]])
    got = attention_alignment_loss(cross, idx, masks, valid)
    per_res = []
    for side, a in cross.items():
        pool = torch.nn.functional.avg_pool2d(masks, 8 // side)
        vals = []
        for b in range(2):
            terms = [((a[b, :, :, idx[b, k]] - pool[b, k]) ** 2).mean() for k in range(2) if valid[b, k]]
            vals.append(sum(terms) / len(terms))
        per_res.append(sum(vals) / 2)
    assert got.item() == pytest.approx((sum(per_res) / 2).item(), rel=1e-5)


def test_self_attention_structure_loss_reference():
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = 1
    flat = mask.flatten()
    same = (flat[:, None] == flat[None, :]).double()
    perfect = (same / same.sum(-1, keepdim=True))[None]
    assert self_attention_structure_loss({4: perfect}, mask).item() == pytest.approx(0.0, abs=1e-12)
    uniform = torch.full((1, 16, 16), 1 / 16, dtype=torch.float64)
    a = 4 / 16  # lesion fraction: other-region mass is 1-a for lesion queries, a for skin queries
    assert self_attention_structure_loss({4: uniform}, mask).item() == pytest.approx(a * (1 - a) + (1 - a) * a)


def test_reconstruction_loss_masked_and_weighted():
    pred, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert reconstruction_loss(pred, target).item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-6)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1  # top half after area pooling
    ref = torch.nn.functional.mse_loss(pred * (mask[:, :, ::2, ::2]), target * (mask[:, :, ::2, ::2]))
    assert reconstruction_loss(pred, target, mask).item() == pytest.approx(ref.item(), rel=1e-6)
    w = torch.tensor([1.0, 0.0])
    ref_w = ((pred[0] - target[0]) ** 2).mean() / 2
    assert reconstruction_loss(pred, target, weights=w).item() == pytest.approx(ref_w.item(), rel=1e-6)
