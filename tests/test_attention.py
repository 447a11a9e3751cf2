"""AttentionCapture against independent references: manual softmax(QK^T/sqrt(d)), unchanged outputs, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from ctrlgen.attention import AttentionCapture, attention_layers, select_layers
from ctrlgen.attention.capture import CaptureProcessor
from diffusers import UNet2DConditionModel


def tiny_unet(seed: int = 0, dtype=torch.float32) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8,
    )
    return unet.eval() if dtype == torch.float32 else unet.eval().to(dtype)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def inputs(b=2, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 16, 16, generator=g, dtype=dtype), torch.tensor(500),
            torch.randn(b, 7, 32, generator=g, dtype=dtype))


def test_layer_sides_follow_the_structure(unet):
    sides = {(l.kind, l.place, 16 // l.factor) for l in attention_layers(unet)}
    assert ("cross", "down", 16) in sides and ("cross", "mid", 8) in sides and ("self", "up", 16) in sides
    # one transformer block per attention: down0 + up1 (2 layers) at 16, down1 + mid + up0 (2) at 8
    assert len(select_layers(unet, "cross", [16])) == 3
    assert len(select_layers(unet, "cross", [8])) == 4
    assert len(select_layers(unet, "self", [16], places=["down"])) == 1


def test_maps_equal_manual_softmax_and_output_unchanged(unet):
    z, t, emb = inputs()
    layer = select_layers(unet, "cross", [16], places=["down"])[0]
    self_layer = select_layers(unet, "self", [8], places=["mid"])[0]
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, key=k: seen.__setitem__(key, o))
             for k, m in (("q", layer.module.to_q), ("k", layer.module.to_k),
                          ("sq", self_layer.module.to_q), ("sk", self_layer.module.to_k))]
    with torch.no_grad():
        ref = unet(z, t, emb).sample
        seen.clear()
        with AttentionCapture(unet, cross_res=[16], self_res=[8], per_layer=True) as store:
            out = unet(z, t, emb).sample
    for h in hooks:
        h.remove()
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()

    def manual(q, k, heads):
        b, n, c = q.shape
        d = c // heads
        qh = q.view(b, n, heads, d).transpose(1, 2)
        kh = k.view(b, -1, heads, d).transpose(1, 2)
        return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)

    expected = manual(seen["q"], seen["k"], layer.module.heads)
    assert torch.allclose(store.layers[layer.name], expected, atol=1e-6)
    expected_self = manual(seen["sq"], seen["sk"], self_layer.module.heads)
    assert torch.allclose(store.layers[self_layer.name], expected_self, atol=1e-6)
    # layer mean of the 16x16 cross maps
    names = [l.name for l in select_layers(unet, "cross", [16])]
    mean = torch.stack([store.layers[n] for n in names]).mean(0).reshape(2, 16, 16, 7)
    assert torch.allclose(store.cross(16), mean, atol=1e-6)
    assert store.count("cross", 16) == 3


def test_rows_sum_to_one(unet):
    z, t, emb = inputs()
    with torch.no_grad(), AttentionCapture(unet, cross_res=[16, 8], self_res=[16, 8]) as store:
        unet(z, t, emb)
    for res in (16, 8):
        assert torch.allclose(store.cross(res).sum(-1), torch.ones(2, res, res), atol=1e-5)
        assert torch.allclose(store.self_attention(res).sum(-1), torch.ones(2, res * res), atol=1e-5)
        assert (store.self_attention(res) >= 0).all()


def test_cfg_batch_keeps_conditional_half_and_output(unet):
    z, t, emb = inputs(b=1)
    uncond = torch.zeros_like(emb)
    with torch.no_grad():
        with AttentionCapture(unet, cross_res=[16], self_res=[16]) as solo:
            unet(z, t, emb)
        ref = unet(torch.cat([z, z]), t, torch.cat([uncond, emb])).sample
        with AttentionCapture(unet, cross_res=[16], self_res=[16]) as store:
            store.cfg_batch = True
            out = unet(torch.cat([z, z]), t, torch.cat([uncond, emb])).sample
    assert torch.allclose(out, ref, atol=1e-5)
    assert store.cross(16).shape[0] == 1
    assert torch.allclose(store.cross(16), solo.cross(16), atol=1e-5)
    assert torch.allclose(store.self_attention(16), solo.self_attention(16), atol=1e-5)


def test_loss_on_maps_backpropagates_to_latent():
    unet = tiny_unet(dtype=torch.float64)
    z, t, emb = inputs(b=1, dtype=torch.float64)
    mask = torch.zeros(16, 16, dtype=torch.float64)
    mask[4:12, 4:12] = 1

    def loss_of(latent):
        with AttentionCapture(unet, cross_res=[16], self_res=[16], keep_grad=True) as store:
            unet(latent, t, emb)
        a = store.cross(16)[0, ..., 3]
        return (a * mask).sum() / a.sum() + store.self_attention(16)[0, :, :100].sum() * 1e-2

    zg = z.clone().requires_grad_(True)
    grad = torch.autograd.grad(loss_of(zg), zg)[0]
    assert grad.abs().sum() > 0
    direction = torch.randn_like(z)
    eps = 1e-5
    with torch.no_grad():
        numeric = (loss_of(z + eps * direction) - loss_of(z - eps * direction)) / (2 * eps)
    assert torch.allclose((grad * direction).sum(), numeric, rtol=1e-4, atol=1e-9)


def test_processors_restored_after_exception(unet):
    before = {name: proc for name, proc in unet.attn_processors.items()}
    hooks_before = len(unet._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionCapture(unet, cross_res=[16, 8], self_res=[16]):
            assert any(isinstance(p, CaptureProcessor) for p in unet.attn_processors.values())
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert all(after[k] is v for k, v in before.items())
    assert len(unet._forward_pre_hooks) == hooks_before


def test_other_layers_keep_their_processor(unet):
    with AttentionCapture(unet, cross_res=[16], self_res=[]):
        procs = unet.attn_processors
        captured = [k for k, p in procs.items() if isinstance(p, CaptureProcessor)]
    assert len(captured) == 3 and all(k.endswith("attn2.processor") for k in captured)
    assert len(procs) == 14


def test_accumulate_averages_calls(unet):
    z, t, emb = inputs()
    with torch.no_grad():
        with AttentionCapture(unet, cross_res=[8]) as a:
            unet(z, t, emb)
        with AttentionCapture(unet, cross_res=[8]) as b:
            unet(z, 100, emb)
        with AttentionCapture(unet, cross_res=[8], accumulate=True) as both:
            unet(z, t, emb)
            unet(z, 100, emb)
    assert torch.allclose(both.cross(8), (a.cross(8) + b.cross(8)) / 2, atol=1e-6)
    assert both.calls == 2


def test_guards(unet):
    with pytest.raises(ValueError, match="no cross-attention layers of side"):
        AttentionCapture(unet, cross_res=[32])
    with pytest.raises(ValueError, match="allow_large_self"):
        AttentionCapture(unet, self_res=[64], latent_size=128)
    with pytest.raises(RuntimeError, match="latent_size"):
        with torch.no_grad(), AttentionCapture(unet, cross_res=[16]):
            unet(torch.randn(1, 4, 32, 32), 10, torch.randn(1, 7, 32))
