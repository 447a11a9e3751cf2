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
    assert set(h) == {"step", "t", "loss", "ca", "sa", "style"} and h["t"] == 700
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
