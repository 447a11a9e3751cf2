"""Guidance by composition: weighted terms in one refiner (Eq. 4.10), checked against hand-summed gradients."""
from __future__ import annotations

import pytest
import torch

import ctrlgen.guidance.refiner as refiner_module
from ctrlgen.attention import AttentionCapture, gaussian_smooth, resize_maps
from ctrlgen.attention.maps import text_token_softmax
from ctrlgen.guidance import (
    CrossAttentionLayoutTerm,
    GuidanceRefiner,
    LayoutGuidance,
    SelfAttentionLayoutTerm,
    StyleTerm,
    TokenMap,
    cross_attention_layout_loss,
    self_attention_layout_loss,
    style_loss,
)
from ctrlgen.models import make_scheduler, published_config
from ctrlgen.sampling import sample

from test_attention import tiny_unet

SCHEDULE = {k: v for k, v in published_config("sd21_base", "scheduler").items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _inputs(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    z, cond = torch.randn(b, 4, 16, 16, generator=g), torch.randn(b, 7, 32, generator=g)
    masks = torch.zeros(b, 64, 64)
    masks[0, 8:40, 16:48] = 1
    masks[-1, 30:60, 4:30] = 1
    style = {700: torch.randn(1, 4, 16, 16, generator=g) * 0.5 + 0.3}
    return z, cond, masks, style


def test_weighted_terms_take_the_hand_summed_gradient_step(unet):
    """Reference: the three losses computed here from the captured maps with the plain loss functions, summed
    by hand with the weights, differentiated per sample (sum over the batch), one step of size η."""
    z, cond, masks, style = _inputs()
    t, eta, w = torch.tensor(700), 3.0, (0.7, 2.0, 0.05)
    tmap = TokenMap(2, 6, cross_res=16)
    refiner = GuidanceRefiner([CrossAttentionLayoutTerm(masks, tmap, weight=w[0]),
                               SelfAttentionLayoutTerm(masks, side=16, weight=w[1]),
                               StyleTerm(style, weight=w[2])], eta=eta, fraction=1.0)
    got = refiner(unet, z, t, cond, 0)

    x = z.clone().requires_grad_(True)
    with torch.enable_grad(), AttentionCapture(unet, cross_res=[16], self_res=[16], keep_grad=True) as store:
        unet(x, t, encoder_hidden_states=cond)
        a = gaussian_smooth(text_token_softmax(store.cross(16), 6, 100.0)[..., 2], 3, 0.5)
        m = resize_maps(masks, 16, mode="area")
        per_sample = [w[0] * cross_attention_layout_loss(a[i:i + 1], m[i:i + 1])
                      + w[1] * self_attention_layout_loss(store.self_attention(16)[i:i + 1], m[i:i + 1])
                      + w[2] * style_loss(x[i:i + 1], style[700]) for i in range(2)]
        grad = torch.autograd.grad(sum(per_sample), x)[0]
    expected = z - eta * grad
    assert grad.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    h = refiner.history[0]
    assert set(h) == {"step", "t", "loss", "ca", "sa", "style", "grad_norm", "step_norm"} and h["t"] == 700
    assert h["grad_norm"] == pytest.approx(float(grad.flatten(1).norm(dim=1).mean()), rel=1e-5)
    assert h["step_norm"] == pytest.approx(eta * h["grad_norm"], rel=1e-5)
    assert h["loss"] == pytest.approx(sum(float(v.detach()) for v in per_sample) / 2, rel=1e-5)


def test_a_refiner_without_terms_is_the_identity_and_calls_nothing(unet):
    z, cond, _, _ = _inputs(1)
    calls = []
    handle = unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = GuidanceRefiner([])(unet, z, torch.tensor(500), cond, 0)
    finally:
        handle.remove()
    assert torch.equal(out, z) and not calls
    unc = torch.zeros(1, 7, 32)
    plain = sample(unet, make_scheduler("ddim", SCHEDULE), z, cond, unc, num_steps=4, guidance_scale=3.0, progress=False)
    refined = sample(unet, make_scheduler("ddim", SCHEDULE), z, cond, unc, num_steps=4, guidance_scale=3.0,
                     refine=GuidanceRefiner([], fraction=1.0), progress=False)
    assert torch.equal(plain.latents, refined.latents)


def test_weight_zero_terms_are_recorded_but_not_followed(unet):
    z, cond, masks, _ = _inputs(2)
    t, tmap = torch.tensor(600), TokenMap(2, 6, cross_res=16)
    sa_only = GuidanceRefiner([SelfAttentionLayoutTerm(masks, side=16)], eta=4.0)
    with_zero = GuidanceRefiner([CrossAttentionLayoutTerm(masks, tmap, weight=0.0), SelfAttentionLayoutTerm(masks, side=16)],
                                eta=4.0)
    torch.testing.assert_close(with_zero(unet, z, t, cond, 0), sa_only(unet, z, t, cond, 0), rtol=0, atol=1e-7)
    assert "ca" in with_zero.history[0] and with_zero.history[0]["loss"] == pytest.approx(with_zero.history[0]["sa"])
    nothing = GuidanceRefiner([CrossAttentionLayoutTerm(masks, tmap, weight=0.0)], eta=4.0)
    assert torch.equal(nothing(unet, z, t, cond, 0), z) and len(nothing.history) == 1


def test_capture_only_at_the_sides_the_terms_read(unet, monkeypatch):
    z, cond, masks, style = _inputs(3)
    seen = []

    class Recording(AttentionCapture):
        def __init__(self, *args, **kwargs):
            seen.append((list(kwargs["cross_res"]), list(kwargs["self_res"])))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(refiner_module, "AttentionCapture", Recording)
    t = torch.tensor(500)
    GuidanceRefiner([CrossAttentionLayoutTerm(masks, TokenMap(2, 6, cross_res=8))])(unet, z, t, cond, 0)
    GuidanceRefiner([SelfAttentionLayoutTerm(masks, side=16)])(unet, z, t, cond, 0)
    calls = []
    handle = unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = GuidanceRefiner([StyleTerm(style, weight=1.0)], eta=1.0)(unet, z, torch.tensor(700), cond, 0)
    finally:
        handle.remove()
    assert seen == [([8], []), ([], [16])]
    assert not calls and not torch.equal(out, z)  # the style term needs no U-Net call, and still moves z
    with pytest.raises(ValueError, match="no style latent for timestep 500"):
        GuidanceRefiner([StyleTerm(style)])(unet, z, t, cond, 0)


def test_step_fraction_iterations_and_the_layout_constructor(unet):
    z, cond, masks, _ = _inputs(4, b=1)
    guide = LayoutGuidance(masks[0], token_index=2, last=6, cross_res=16, self_res=16, eta=2.0, iterations=2,
                           fraction=0.25)
    assert [t.name for t in guide.terms] == ["ca", "sa"]
    assert [guide.active(i, 8) for i in range(8)] == [True, True] + [False] * 6
    sample(unet, make_scheduler("ddim", SCHEDULE), z, cond, torch.zeros(1, 7, 32), num_steps=8, guidance_scale=3.0,
           refine=guide, progress=False)
    assert [h["step"] for h in guide.history] == [0, 0, 1, 1]  # two iterations on each of the first 2 of 8 steps
    assert [t.name for t in LayoutGuidance(masks[0], 2, 6, self_res=0).terms] == ["ca"]
    with pytest.raises(ValueError, match="distinct names"):
        GuidanceRefiner([SelfAttentionLayoutTerm(masks), SelfAttentionLayoutTerm(masks)])


class _Linear:
    """L(z) = Σ c ⊙ z per sample: gradient c, whatever z is (a closed form for the step)."""

    name, weight, cross_res, self_res = "lin", 1.0, (), ()

    def __init__(self, c: torch.Tensor):
        self.c = c

    def __call__(self, ctx):
        return (ctx.latents * self.c).flatten(1).sum(1)


def test_max_normalisation_makes_eta_the_largest_latent_change_per_sample():
    """ZestGuide's ∇/‖∇‖_∞ (closed form for a linear loss): each sample's largest change is η, whatever the scale of its
    gradient (1e-3 and 10 here); "none" keeps Eq. (4.10)'s raw step; a zero gradient stays zero; history reports both
    norms."""
    c = torch.zeros(3, 4, 2, 2)
    c[0, 0, 0, 0], c[0, 1, 1, 1] = 1e-3, -4e-4
    c[1, 2, 0, 1], c[1, 3, 1, 0] = 10.0, 2.5
    z = torch.randn(3, 4, 2, 2)
    eta = 0.3
    raw = GuidanceRefiner([_Linear(c)], eta=eta)(None, z, 500, None, 0)
    torch.testing.assert_close(raw, z - eta * c)
    refiner = GuidanceRefiner([_Linear(c)], eta=eta, normalize="max")
    got = refiner(None, z, 500, None, 0)
    expected = z.clone()
    expected[0, 0, 0, 0] -= 0.3
    expected[0, 1, 1, 1] += 0.3 * 0.4
    expected[1, 2, 0, 1] -= 0.3
    expected[1, 3, 1, 0] -= 0.3 * 0.25
    torch.testing.assert_close(got, expected)
    h = refiner.history[0]
    assert h["grad_norm"] == pytest.approx(float(c.flatten(1).norm(dim=1).mean()), rel=1e-5)
    assert h["step_norm"] == pytest.approx((0.3 * (1 + 0.16) ** 0.5 + 0.3 * (1 + 0.0625) ** 0.5) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="normalize must be"):
        GuidanceRefiner([_Linear(c)], normalize="l2")


def _contrast(unet, z, cond, masks, tmap):
    """Mean token map inside the mask minus outside, and L_CA, at z."""
    with torch.no_grad(), AttentionCapture(unet, cross_res=[16], self_res=[], keep_grad=False) as store:
        unet(z, torch.tensor(800), encoder_hidden_states=cond)
        a = tmap(store)
    m = resize_maps(masks, 16, mode="area")
    inside = (a * m).sum((-2, -1)) / m.sum((-2, -1))
    outside = (a * (1 - m)).sum((-2, -1)) / (1 - m).sum((-2, -1))
    return inside - outside, cross_attention_layout_loss(a, m, reduction="none")


def test_l_ca_has_a_gradient_and_its_normalised_steps_move_the_token_map_into_the_mask(unet):
    """The §4.3.4 failure on the mini derm model: its token attention is nearly uniform, so the ×100 token softmax
    leaves the <lesion> column near 1/(#tokens) everywhere (not saturated: the gradient does not vanish, it is
    small, ‖∇L_CA‖ ≈ 1e-3), L_CA ≈ 1, and the raw step at the thesis η barely moved z_t: the L_CA-only run equalled
    the unguided one. Here: L_CA ≈ 1 with a non-zero gradient; a model whose attention reacts 1e4 times more weakly
    (the term's weight 1e-4) gets a raw step that changes L_CA by under 1e-4 while ∇/‖∇‖_∞ takes the same step as at
    full strength; and those steps raise the map inside the mask against outside and lower L_CA in every sample."""
    z, cond, masks, _ = _inputs(5)
    tmap = TokenMap(2, 6, cross_res=16)
    t = torch.tensor(800)
    contrast0, l0 = _contrast(unet, z, cond, masks, tmap)
    assert bool(((l0 - 1).abs() < 0.05).all())  # the flat token column: inside ≈ outside
    weak = GuidanceRefiner([CrossAttentionLayoutTerm(masks, tmap, weight=1e-4)], eta=20.0, fraction=1.0)
    z_weak = weak(unet, z, t, cond, 0)
    assert weak.history[0]["grad_norm"] > 0
    assert (_contrast(unet, z_weak, cond, masks, tmap)[1] - l0).abs().max() < 1e-4  # the raw step: no effect
    steps = {w: GuidanceRefiner([CrossAttentionLayoutTerm(masks, tmap, weight=w)], eta=0.5, iterations=5, fraction=1.0,
                                normalize="max") for w in (1.0, 1e-4)}
    z_norm = {w: r(unet, z, t, cond, 0) for w, r in steps.items()}
    torch.testing.assert_close(z_norm[1e-4], z_norm[1.0], rtol=1e-4, atol=1e-4)
    contrast1, l1 = _contrast(unet, z_norm[1e-4], cond, masks, tmap)
    assert bool((contrast1 > contrast0 + 0.01).all()) and bool((l1 < l0 - 0.01).all()), (contrast0, contrast1, l0, l1)


class _Store:
    """An attention store holding given cross-attention maps ``(B, h, w, T)`` at one side."""

    def __init__(self, cross: torch.Tensor):
        self._cross = cross

    def cross(self, side: int) -> torch.Tensor:
        assert side == self._cross.shape[1]
        return self._cross


def test_a_dominant_token_saturates_the_x100_softmax_and_a_scale_of_one_restores_the_gradient():
    """The region-aware mini model (150 steps) measured: raw <skin> ≈ 0.41 at every pixel, <lesion> 0.05–0.07. Built by
    hand here: under the ×100 token softmax the <lesion> column is < 1e-12 everywhere, L_CA = 1 to 1e-9 and its gradient
    w.r.t. the maps < 1e-9 (the vanishing gradient); at scale 1 the gradient is of order 1e-2 and a step along it raises
    the <lesion> map inside the mask against outside."""
    g = torch.Generator().manual_seed(0)
    cross = torch.full((1, 8, 8, 6), 0.02)
    cross[..., 3] = 0.41                                       # <skin>: high everywhere
    cross[..., 1] = 0.06 + 0.01 * torch.rand(1, 8, 8, generator=g)  # <lesion>: low and nearly flat
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1

    def loss_and_grad(scale: float, maps: torch.Tensor):
        x = maps.clone().requires_grad_(True)
        term = CrossAttentionLayoutTerm(mask, TokenMap(1, 5, cross_res=8, softmax_scale=scale, smoothing_kernel=1))
        ctx = refiner_module.GuidanceContext(_Store(x), torch.zeros(1), 0, 0)
        loss = term(ctx).sum()
        return float(loss.detach()), torch.autograd.grad(loss, x)[0], float(ctx.cache[term.token_map].detach().max())

    loss100, grad100, peak100 = loss_and_grad(100.0, cross)
    assert peak100 < 1e-12 and loss100 == pytest.approx(1.0, abs=1e-9) and grad100.abs().max() < 1e-9
    loss1, grad1, _ = loss_and_grad(1.0, cross)
    assert grad1[..., 1].abs().max() > 1e-2
    stepped = cross - 1.0 * grad1
    inside = lambda a: float((a[0, ..., 1] * mask[0]).sum() / mask.sum()  # noqa: E731
                             - (a[0, ..., 1] * (1 - mask[0])).sum() / (1 - mask).sum())
    assert inside(stepped) > inside(cross) + 0.01 and loss_and_grad(1.0, stepped)[0] < loss1


# ---------------------------------------------------------------- the terms' shared shape (map, mask at its side, loss)
class FixedStore:
    """Stands in for an ``AttentionStore``: fixed random maps, cross ``(B, s, s, T)`` and self ``(B, s², s²)``
    (rows softmax-normalised like attention)."""

    def __init__(self, batch: int = 2, side: int = 8, tokens: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.side = side
        self.cross_maps = torch.rand(batch, side, side, tokens, generator=g).softmax(-1)
        self.self_maps = (4 * torch.rand(batch, side * side, side * side, generator=g)).softmax(-1)

    def cross(self, side: int) -> torch.Tensor:
        assert side == self.side, side
        return self.cross_maps

    def self_attention(self, side: int) -> torch.Tensor:
        assert side == self.side, side
        return self.self_maps


def _context(store):
    from ctrlgen.guidance import GuidanceContext

    return GuidanceContext(store, torch.zeros(2, 4, 8, 8), 500, 0)


def test_layout_terms_are_their_losses_on_the_token_map_and_the_mask_pooled_to_its_side():
    """L_CA and L_SA terms on fixed random maps, against the loss functions on maps and masks built by hand
    (the 32-px masks area-pooled 4×4 to the maps' side 8)."""
    from ctrlgen.guidance.terms import SelfAttentionMaskTerm, TokenMapMaskTerm

    store = FixedStore()
    masks = torch.zeros(2, 32, 32)
    masks[0, 4:22, 6:30] = 1
    masks[1, 10:31, 1:17] = 1
    pooled = masks.view(2, 8, 4, 8, 4).mean((2, 4))
    tmap = TokenMap(2, 6, cross_res=8)
    a = gaussian_smooth(text_token_softmax(store.cross_maps, 6, 100.0)[..., 2], 3, 0.5)
    ca, sa = CrossAttentionLayoutTerm(masks, tmap), SelfAttentionLayoutTerm(masks, side=8, normalize="queries")
    assert isinstance(ca, TokenMapMaskTerm) and isinstance(sa, SelfAttentionMaskTerm)
    assert ca.cross_res == (8,) and ca.self_res == () and sa.self_res == (8,) and sa.cross_res == ()
    torch.testing.assert_close(ca(_context(store)), cross_attention_layout_loss(a, pooled, reduction="none"))
    torch.testing.assert_close(sa(_context(store)),
                               self_attention_layout_loss(store.self_maps, pooled, "queries", reduction="none"))
    background = SelfAttentionLayoutTerm(masks, side=8)(_context(store))  # Eq. (4.9): divided by Σ(1 − M)
    m = pooled.flatten(1)
    by_hand = (m[:, :, None] * store.self_maps * (1 - m)[:, None, :]).sum((1, 2)) / (1 - m).sum(1)
    torch.testing.assert_close(background, by_hand)


def test_a_new_term_supplies_only_its_loss():
    """A term on the shared shape receives the token map and the mask at the map side; without ``loss`` it says so."""
    from dataclasses import dataclass

    from ctrlgen.guidance.terms import TokenMapMaskTerm

    @dataclass
    class InsideMass(TokenMapMaskTerm):
        mask: torch.Tensor
        token_map: TokenMap
        name, weight, self_res = "inside", 1.0, ()  # what the refiner reads (GuidanceTerm), not fields here

        def loss(self, token_map, mask):
            return -(token_map * mask).sum((-2, -1))

    store = FixedStore()
    mask = torch.zeros(32, 32)
    mask[:16] = 1  # top half: rows 0–3 of the 8×8 map
    tmap = TokenMap(3, 7, cross_res=8, smoothing_kernel=1)
    a = text_token_softmax(store.cross_maps, 7, 100.0)[..., 3]
    torch.testing.assert_close(InsideMass(mask, tmap)(_context(store)), -a[:, :4].sum((-2, -1)))

    @dataclass
    class NoLoss(TokenMapMaskTerm):
        mask: torch.Tensor
        token_map: TokenMap

    with pytest.raises(TypeError, match="abstract method 'loss'|abstract method loss"):   # at construction, not first call
        NoLoss(mask, tmap)
