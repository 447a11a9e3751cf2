"""The training-free mask → image baselines of §4.4.4: ZestGuide and Attention-Refocusing as guidance terms.

References: hand-computed losses on 2 × 2 maps, the sign of the gradient with respect to the attention, and on
a tiny U-Net the refiner's step against the loss recomputed from the captured maps by hand.
"""
from __future__ import annotations

import pytest
import torch

from ctrlgen.attention import AttentionCapture, gaussian_smooth, resize_maps
from ctrlgen.attention.maps import text_token_softmax
from ctrlgen.config import load_profile
from ctrlgen.guidance import GuidanceRefiner, TokenMap
from ctrlgen.methods.baselines.attention_refocusing import (
    CrossAttentionRefocusTerm,
    RefocusConfig,
    SelfAttentionRefocusTerm,
    car_loss,
    refocus_refiner,
    sar_loss,
)
from ctrlgen.methods.baselines.zestguide import ZestGuideConfig, ZestGuideTerm, zestguide_loss, zestguide_refiner

from test_attention import tiny_unet

A = torch.tensor([[[0.5, 0.3], [0.1, 0.1]]])
M = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])


# ---------------------------------------------------------------------------------------------- ZestGuide
def test_zestguide_loss_by_hand():
    # Ŝ = A / 0.5 = [[1, .6], [.2, .2]]; Σ Ŝ S / Σ Ŝ = 1 / 2 -> loss 0.5 (the raw map gives the same ratio)
    assert zestguide_loss(A, M).item() == pytest.approx(0.5)
    assert zestguide_loss(3 * A, M).item() == pytest.approx(0.5)
    both = torch.cat([A, torch.tensor([[[0.0, 0.2], [0.2, 0.0]]])])
    torch.testing.assert_close(zestguide_loss(both, M), torch.tensor([0.5, 1.0]))


def test_zestguide_loss_is_zero_when_attention_equals_the_target():
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert zestguide_loss(target * 0.4, target).item() == pytest.approx(0.0, abs=1e-7)


def test_zestguide_gradient_moves_attention_into_the_mask():
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    a = torch.softmax(logits.flatten(1), 1).view(1, 2, 2)
    loss = zestguide_loss(a, M).sum()
    (g,) = torch.autograd.grad(loss, logits)
    assert g[0, 0, 0] < 0 and (g[0].flatten()[1:] > 0).all()  # descent raises the inside logit, lowers the others
    a2 = torch.softmax((logits - 0.5 * g).flatten(1), 1).view(1, 2, 2)
    assert zestguide_loss(a2, M).item() < loss.item() and a2[0, 0, 0] > 0.25


def test_zestguide_term_needs_one_mask_per_token():
    with pytest.raises(ValueError, match="one mask per segment token"):
        ZestGuideTerm([M[0]], [1, 2])
    with pytest.raises(ValueError, match="side"):
        zestguide_loss(torch.rand(1, 4, 4), M)


# ---------------------------------------------------------------------------------------------- Attention-Refocusing
def test_car_loss_by_hand():
    a = torch.tensor([[[0.6, 0.2], [0.3, 0.1]]])
    top = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # inside peak 0.6, outside peak 0.3: (1 − 0.6) + 0.5 · 0.3
    assert car_loss(a, top).item() == pytest.approx(0.55)
    assert car_loss(a, top, background_weight=1.0).item() == pytest.approx(0.7)
    assert car_loss(top.clone(), top).item() == pytest.approx(0.0)  # attention equal to the target


def test_car_gradient_raises_the_inside_peak_and_lowers_the_outside_peak():
    a = torch.tensor([[[0.6, 0.2], [0.3, 0.1]]], requires_grad=True)
    (g,) = torch.autograd.grad(car_loss(a, torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])).sum(), a)
    torch.testing.assert_close(g, torch.tensor([[[-1.0, 0.0], [0.5, 0.0]]]))


def test_sar_loss_by_hand():
    # 2 × 2 image, query pixels 0 and 1 in the mask; their rows' mass on pixels 2, 3: 0.4 and 0.1 -> mean 0.25
    sa = torch.tensor([[[0.5, 0.1, 0.3, 0.1], [0.45, 0.45, 0.1, 0.0], [0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]]])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert sar_loss(sa, mask).item() == pytest.approx(0.25)
    block = torch.tensor([[[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]])
    assert sar_loss(block, mask).item() == pytest.approx(0.0)  # region pixels attend only to the region


# ---------------------------------------------------------------------------------------------- on a U-Net
@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(3)
    z, cond = torch.randn(b, 4, 16, 16, generator=g), torch.randn(b, 7, 32, generator=g)
    masks = torch.zeros(b, 64, 64)
    masks[0, 8:40, 16:48] = 1
    masks[1, 30:60, 4:30] = 1
    return z, cond, masks


def test_zestguide_refiner_takes_the_step_of_the_hand_computed_loss(unet):
    z, cond, masks = _inputs()
    t, eta = torch.tensor(600), 2.0
    refiner = zestguide_refiner(masks, 2, 4, ZestGuideConfig(eta=eta, fraction=1.0, cross_res=16))
    got = refiner(unet, z, t, cond, 0)
    x = z.clone().requires_grad_(True)
    with torch.enable_grad(), AttentionCapture(unet, cross_res=[16], keep_grad=True) as store:
        unet(x, t, encoder_hidden_states=cond)
        cross, m = store.cross(16), resize_maps(masks, 16, mode="area")
        share = lambda a, s: (a * s).sum((-2, -1)) / a.sum((-2, -1))  # noqa: E731
        loss = ((1 - share(cross[..., 2], m)) + (1 - share(cross[..., 4], 1 - m))).sum()
        grad = torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(got, z - eta * grad, rtol=1e-5, atol=1e-6)
    # the hand loss skips Ŝ = A / max A: the ratio Σ Ŝ S / Σ Ŝ does not change with the scale
    assert refiner.history[0]["zest"] == pytest.approx(float(loss.detach()) / 2, rel=1e-5)
    # the paper's step: the gradient over its ∞-norm, per sample (each sample's largest latent change is η)
    paper = zestguide_refiner(masks, 2, 4, ZestGuideConfig(eta=eta, fraction=1.0, cross_res=16, normalize="max"))
    peak = grad.abs().flatten(1).amax(1)[:, None, None, None]
    torch.testing.assert_close(paper(unet, z, t, cond, 0), z - eta * grad / peak, rtol=1e-4, atol=1e-5)
    assert ZestGuideConfig.from_profile(load_profile("smoke")).normalize == "none"  # profile without the key: raw step


def test_refocus_refiner_matches_the_hand_computed_losses_and_lowers_them(unet):
    z, cond, masks = _inputs()
    t = torch.tensor(600)
    cfg = RefocusConfig(eta=0.5, fraction=1.0, cross_res=16, self_res=16)
    refiner = refocus_refiner(masks, 2, 6, cfg)
    assert [type(term) for term in refiner.terms] == [CrossAttentionRefocusTerm, SelfAttentionRefocusTerm]
    before = refiner.losses(unet, z.clone().requires_grad_(True), t, cond)
    with torch.enable_grad(), AttentionCapture(unet, cross_res=[16], self_res=[16], keep_grad=True) as store:
        unet(z, t, encoder_hidden_states=cond)
        a = gaussian_smooth(text_token_softmax(store.cross(16), 6, 100.0)[..., 2], 3, 0.5)
        m = resize_maps(masks, 16, mode="area")
        car = torch.stack([(1 - (a[i] * m[i]).max()) + 0.5 * (a[i] * (1 - m[i])).max() for i in range(2)])
    torch.testing.assert_close(before["car"].detach(), car.detach(), rtol=1e-5, atol=1e-6)
    # a small step along −∇ lowers the weighted sum (the direction is descent, not ascent)
    total = lambda v: float((v["car"] + v["sar"]).detach().sum())  # noqa: E731
    stepped = refiner(unet, z, t, cond, 0)
    after = refiner.losses(unet, stepped.clone().requires_grad_(True), t, cond)
    assert total(after) < total(before)
    assert refocus_refiner(masks, 2, 6, RefocusConfig(sar_weight=0.0, cross_res=16)).terms[0].name == "car"
    assert len(refocus_refiner(masks, 2, 6, RefocusConfig(sar_weight=0.0, cross_res=16)).terms) == 1


def test_terms_compose_with_the_book_refiner_names(unet):
    z, cond, masks = _inputs()
    tmap = TokenMap(2, 6, cross_res=16)
    refiner = GuidanceRefiner([CrossAttentionRefocusTerm(masks, tmap), ZestGuideTerm([masks], [2], (16,))],
                              eta=1.0, fraction=1.0)
    refiner(unet, z, torch.tensor(500), cond, 0)
    assert {"car", "zest", "loss"} <= set(refiner.history[0])


def test_sar_term_is_the_official_per_layer_loss_on_fixed_random_maps():
    """L_SAR as the official ``loss_one_att_outside`` computes it, by hand on two random 8×8 self-attention layers
    and a box: per layer, the in-box query rows summed and divided by their count, times the outside mask, summed;
    then averaged over the layers. The term reads the layer-averaged map (what the capture keeps): the same number,
    the loss being linear in A_S. It is the book's L_SA term with the per-query normalisation fixed."""
    from ctrlgen.guidance import GuidanceContext, SelfAttentionLayoutTerm

    g = torch.Generator().manual_seed(0)
    layers = [(3 * torch.rand(2, 64, 64, generator=g)).softmax(-1) for _ in range(2)]
    box = torch.zeros(8, 8)
    box[2:6, 1:5] = 1
    inside = [r * 8 + c for r in range(2, 6) for c in range(1, 5)]
    official = sum((layer[:, inside, :].sum(1) / len(inside) * (1 - box).flatten()).sum(-1) for layer in layers) / 2

    class Store:
        def self_attention(self, side):
            assert side == 8
            return (layers[0] + layers[1]) / 2

    term = SelfAttentionRefocusTerm(box, 8, 2.0)  # positional: mask, side, weight, as before
    assert isinstance(term, SelfAttentionLayoutTerm) and term.normalize == "queries" and term.weight == 2.0
    assert term.name == "sar" and term.self_res == (8,) and term.cross_res == ()
    torch.testing.assert_close(term(GuidanceContext(Store(), torch.zeros(2, 4, 8, 8), 500, 0)), official)
    with pytest.raises(TypeError):
        SelfAttentionRefocusTerm(box, 8, normalize="background")  # the official normalisation is not a choice


def test_car_term_is_car_loss_on_the_token_map_and_the_mask_pooled_to_its_side():
    """CAR shares L_CA's map and mask handling (``TokenMapMaskTerm``) and differs in its loss only: on a fixed
    random cross-attention map, the peaks inside and outside the 16-px box pooled 2×2 to the map side 8, by hand."""
    from ctrlgen.guidance import GuidanceContext
    from ctrlgen.guidance.terms import TokenMapMaskTerm

    cross = torch.rand(1, 8, 8, 9, generator=torch.Generator().manual_seed(1)).softmax(-1)

    class Store:
        def cross(self, side):
            assert side == 8
            return cross

    box = torch.zeros(16, 16)
    box[4:12, 2:8] = 1  # rows 2–5, columns 1–3 at side 8
    tmap = TokenMap(2, 6, cross_res=8)
    a = gaussian_smooth(text_token_softmax(cross, 6, 100.0)[..., 2], 3, 0.5)[0]
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 1:4] = True
    want = (1 - a[inside].max()) + 0.3 * a[~inside].max()
    term = CrossAttentionRefocusTerm(box, tmap, 0.3)
    assert isinstance(term, TokenMapMaskTerm) and term.cross_res == (8,) and term.self_res == ()
    got = term(GuidanceContext(Store(), torch.zeros(1, 4, 8, 8), 500, 0))
    torch.testing.assert_close(got, want[None])
