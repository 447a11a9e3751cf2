"""Self-attention K/V recording and injection: manual attention, identity and restoration checks."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from diffusers.models.attention_processor import Attention

from ctrlgen.attention import KVInjector, KVRecorder, KVSelection, KVStore, interleave_branches, split_branches
from ctrlgen.attention.kv import KVInjectProcessor
from ctrlgen.attention.layers import AttentionLayer

from test_attention import tiny_unet


def test_inject_processor_equals_manual_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    layout, style_in, style_ref = torch.randn(3, 1, 9, 16).unbind(0)
    store = KVStore()
    store.put(7, "layer", attn.to_k(style_ref), attn.to_v(style_ref))
    owner = SimpleNamespace(injecting=lambda: True, branches=2, style_branch=1, query_from=0, store=store, timestep=7)
    proc = KVInjectProcessor(AttentionLayer("layer", attn, "self", "up", 0, 1), owner)
    with torch.no_grad():
        out = proc(attn, interleave_branches(layout, style_in))
        out_layout, out_style = split_branches(out)

        def manual(q_src, kv_src):
            q = attn.to_q(q_src).view(1, 9, 2, 8).transpose(1, 2)
            k = attn.to_k(kv_src).view(1, 9, 2, 8).transpose(1, 2)
            v = attn.to_v(kv_src).view(1, 9, 2, 8).transpose(1, 2)
            o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
            return attn.to_out[0](o.transpose(1, 2).reshape(1, 9, 16))

        assert torch.allclose(out_layout, manual(layout, layout), atol=1e-6)
        assert torch.allclose(out_style, manual(layout, style_ref), atol=1e-6)  # layout queries, style K/V


def test_record_then_inject_through_unet():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 1, 4, 16, 16, generator=g).unbind(0)
    emb = torch.randn(1, 7, 32, generator=g)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        plain_x = unet(x, 300, emb).sample
        with KVRecorder(unet, KVSelection(places=("up",))) as rec:
            recorded = unet(x, 300, emb).sample
        assert torch.allclose(recorded, plain_x, atol=1e-5)  # recording does not change the output
        assert rec.store.timesteps == [300] and len(rec.store.data[300]) == 4  # 4 up-block self-attention layers
        # style branch with x's own K/V and x as layout: identical to the plain output
        with KVInjector(unet, rec.store) as inj:
            out = unet(interleave_branches(x, y), 300, emb.expand(2, -1, -1)).sample
            lay, sty = split_branches(out)
            inj.active = False
            off = unet(interleave_branches(y, y), 300, emb.expand(2, -1, -1)).sample
        assert torch.allclose(lay, plain_x, atol=1e-5)
        # the style branch's own input never enters the injected layers' queries: only y's
        # (non-injected) layers differ, so it must differ from the layout branch but not be plain y
        plain_y = unet(y, 300, emb).sample
        assert not torch.allclose(sty, plain_y, atol=1e-3)
        assert torch.allclose(split_branches(off)[1], plain_y, atol=1e-5)
        # with layout = style-branch input = x, injection of x's K/V reproduces x exactly
        with KVInjector(unet, rec.store):
            both = unet(interleave_branches(x, x), 300, emb.expand(2, -1, -1)).sample
        assert torch.allclose(split_branches(both)[1], plain_x, atol=1e-5)
    after = unet.attn_processors
    assert all(after[k] is v for k, v in before.items())
    assert len(unet._forward_pre_hooks) == 0


def test_injection_under_cfg_groups():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 1, 4, 16, 16, generator=g).unbind(0)
    emb, unc = torch.randn(2, 1, 7, 32, generator=g).unbind(0)
    with torch.no_grad():
        with KVRecorder(unet) as rec:
            unet(x, 500, emb)
        batch = torch.cat([interleave_branches(y, y), interleave_branches(y, y)])  # [u_L, u_S, c_L, c_S]
        embs = torch.cat([unc, unc, emb, emb])
        with KVInjector(unet, rec.store):
            out = unet(batch, 500, embs).sample
        ref_u = unet(y, 500, unc).sample
    assert torch.allclose(out[0:1], ref_u, atol=1e-5)  # unconditional layout branch untouched
    assert not torch.allclose(out[1:2], ref_u, atol=1e-3)  # unconditional style branch injected
