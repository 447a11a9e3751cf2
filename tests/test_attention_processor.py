"""The processor base and the swap context manager against independent references.

References: diffusers' own ``AttnProcessor2_0`` (the base with no override must reproduce it), a
hand-written softmax(QK^T/sqrt(d)) per head, a diffusers scheduler's timesteps, processor identities.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ctrlgen.attention import (
    AttentionCapture,
    AttentionProcessorBase,
    DualBranchInjector,
    KVStore,
    ProcessorSwap,
    Projected,
    attention_layers,
    interleave_branches,
    select_layers,
    split_branches,
)

from test_attention import inputs, tiny_unet


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


class ExplicitProcessor(AttentionProcessorBase):
    """The explicit path of the base: probabilities through ``get_attention_scores``, then ``P V``."""

    def attend(self, attn: Attention, p: Projected) -> torch.Tensor:
        return self.apply_probabilities(attn, self.probabilities(attn, p.query, p.key, p.mask), p.value)


def _everywhere(unet, processor_cls):
    return ProcessorSwap(unet, attention_layers(unet), factory=lambda layer, swap: processor_cls(layer, swap))


@pytest.mark.parametrize("processor_cls", [AttentionProcessorBase, ExplicitProcessor])
def test_base_processor_reproduces_diffusers_sdpa_processor(unet, processor_cls):
    z, t, emb = inputs()
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0  # padding tokens of the first prompt: exercises the attention-mask path
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        ref, ref_masked = unet(z, t, emb).sample, unet(z, t, emb, encoder_attention_mask=mask).sample
        with _everywhere(unet, processor_cls):
            assert all(isinstance(p, processor_cls) for p in unet.attn_processors.values())
            out, out_masked = unet(z, t, emb).sample, unet(z, t, emb, encoder_attention_mask=mask).sample
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert torch.allclose(out_masked, ref_masked, atol=1e-5)
    assert not torch.allclose(ref, ref_masked, atol=1e-3)  # the mask matters, so the comparison can fail


@pytest.mark.parametrize("kwargs", [dict(qk_norm="layer_norm"),
                                    dict(norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0)])
def test_base_processor_covers_qk_norms_group_norm_residual_and_rescale(kwargs):
    """Module branches the U-Net does not use: per-head Q/K norms; 4-D input with group norm, residual, rescale."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, **kwargs).eval()
    x = torch.randn(2, 16, 3, 3) if "norm_num_groups" in kwargs else torch.randn(2, 9, 16)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x)
        for cls in (AttentionProcessorBase, ExplicitProcessor):
            attn.set_processor(cls())
            assert torch.allclose(attn(x), ref, atol=1e-6)


def test_only_selected_layers_are_swapped_and_restored_by_identity(unet):
    before = dict(unet.attn_processors)
    chosen = select_layers(unet, "self", [8], places=["up"])
    with ProcessorSwap(unet, chosen, factory=AttentionProcessorBase) as swap:
        during = unet.attn_processors
        swapped = {k for k in during if during[k] is not before[k]}
        assert swapped == {f"{l.name}.processor" for l in chosen} and len(swapped) == 2
        assert all(isinstance(during[k], AttentionProcessorBase) and during[k].swap is swap for k in swapped)
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_restored_after_an_exception_inside_and_while_entering(unet):
    before, hooks = dict(unet.attn_processors), len(unet._forward_pre_hooks)
    z, t, emb = inputs()
    with pytest.raises(RuntimeError, match="boom"):
        with ProcessorSwap(unet, attention_layers(unet), factory=AttentionProcessorBase):
            assert len(unet._forward_pre_hooks) == hooks + 1
            with torch.no_grad():
                unet(z, t, emb)
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is before[k] for k in before)
    assert len(unet._forward_pre_hooks) == hooks
    made = []

    def factory(layer, swap):  # fails on the third layer: the first two must be put back
        if len(made) == 2:
            raise ValueError("no processor for this layer")
        made.append(layer)
        return AttentionProcessorBase(layer, swap)

    with pytest.raises(ValueError, match="no processor"):
        with ProcessorSwap(unet, attention_layers(unet), factory=factory):
            pass
    assert all(unet.attn_processors[k] is before[k] for k in before)
    assert len(unet._forward_pre_hooks) == hooks


def test_timestep_and_step_follow_a_scheduler_loop(unet):
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(4)
    expected_t = [int(t) for t in sched.timesteps]
    assert expected_t == [750, 500, 250, 0]
    seen: list[tuple[int, int]] = []

    class Seen(AttentionProcessorBase):
        def attend(self, attn, p):
            seen.append((self.swap.timestep, self.swap.step))
            return super().attend(attn, p)

    layer = select_layers(unet, "cross", [8], places=["mid"])
    z, _, emb = inputs(b=1)
    with torch.no_grad(), ProcessorSwap(unet, layer, factory=Seen) as swap:
        for t in sched.timesteps:
            unet(z, t, emb)  # a guidance call ...
            unet(z, timestep=t.expand(1), encoder_hidden_states=emb)  # ... and the prediction, same step
        assert swap.calls == 8
        swap.step = 10  # a loop that counts itself: the hook no longer advances the step
        unet(z, 999, emb)
    assert seen == [(t, i) for i, t in enumerate(expected_t) for _ in range(2)] + [(999, 10)]


def test_capture_maps_per_head_equal_hand_softmax_and_store_timesteps(unet):
    z, t, emb = inputs()
    layer = select_layers(unet, "cross", [8], places=["mid"])[0]
    seen = {}
    hooks = [getattr(layer.module, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in ("to_q", "to_k")]
    with torch.no_grad(), AttentionCapture(unet, cross_res=[8], places=["mid"], per_head=True) as store:
        unet(z, t, emb)
    for h in hooks:
        h.remove()
    heads, d = layer.module.heads, seen["to_q"].shape[-1] // layer.module.heads
    q = seen["to_q"].view(2, -1, heads, d).transpose(1, 2)
    k = seen["to_k"].view(2, -1, heads, d).transpose(1, 2)
    by_hand = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    assert store.layers[layer.name].shape == (2, heads, 64, 7)
    assert torch.allclose(store.layers[layer.name], by_hand, atol=1e-6)
    assert torch.allclose(store.cross(8).reshape(2, 64, 7), by_hand.mean(1), atol=1e-6)
    assert store.timesteps == [int(t)]


# -- chapter 5: two branches in one call ------------------------------------------------------------------


class HandInjected:
    """Test-local processor: ``softmax(Q K^T / sqrt(d)) V`` with given Q, K, V, then ``to_out`` (the transformer
    blocks' self-attention has 3-D input, no norms and no residual inside the module)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.q, self.k, self.v = q, k, v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert hidden_states.ndim == 3 and attn.group_norm is None and not attn.residual_connection
        heads = attn.heads
        split = lambda x: x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q), split(self.k), split(self.v)
        out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], -1, heads * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _outputs_of(modules: dict, attr: str, run) -> dict:
    got, hooks = {}, [getattr(m, attr).register_forward_hook(lambda mod, i, o, n=n: got.__setitem__(n, o))
                      for n, m in modules.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return got


def test_dual_branch_injection_is_the_style_branch_alone_with_layout_queries_and_style_kv():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(5)
    ref_latent, layout, style = torch.randn(3, 1, 4, 16, 16, generator=g).unbind(0)
    emb = torch.randn(1, 7, 32, generator=g)
    t = 400
    decoder = {l.name: l.module for l in attention_layers(unet) if l.kind == "self" and l.place == "up"}
    assert len(decoder) == 4
    with torch.no_grad():
        # by hand: style K/V from the reference, layout queries from the layout branch run alone
        keys = _outputs_of(decoder, "to_k", lambda: unet(ref_latent, t, emb))
        values = _outputs_of(decoder, "to_v", lambda: unet(ref_latent, t, emb))
        queries = _outputs_of(decoder, "to_q", lambda: unet(layout, t, emb))
        ref_layout = unet(layout, t, emb).sample
        for name, m in decoder.items():
            m.set_processor(HandInjected(queries[name], keys[name], values[name]))
        ref_style = unet(style, t, emb).sample
        for m in decoder.values():
            m.set_processor(AttnProcessor2_0())
        plain_style = unet(style, t, emb).sample

        store = KVStore()
        for name in decoder:
            store.put(t, name, keys[name], values[name])
        calls = []
        counter = unet.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            with DualBranchInjector(unet, store) as inj:
                both = unet(interleave_branches(layout, style), t, emb.expand(2, -1, -1)).sample
        finally:
            counter.remove()
    assert len(calls) == 1 and inj.calls == 1  # one batched U-Net call
    out_layout, out_style = split_branches(both)
    assert torch.allclose(out_layout, ref_layout, atol=1e-5)
    assert torch.allclose(out_style, ref_style, atol=1e-5)
    assert not torch.allclose(out_style, plain_style, atol=1e-3)  # the injection changed the style branch


def test_dual_branch_starts_at_the_bifurcation_step_and_pauses_for_layout_guidance():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(6)
    ref_latent, z = torch.randn(2, 1, 4, 16, 16, generator=g).unbind(0)
    emb = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        from ctrlgen.attention import KVRecorder
        with KVRecorder(unet) as rec:
            unet(ref_latent, 300, emb)
        plain_600, plain_300 = unet(z, 600, emb).sample, unet(z, 300, emb).sample
        with DualBranchInjector(unet, rec.store, bifurcation_step=1) as inj:
            early = unet(z, 600, emb).sample  # step 0: one shared latent, no injection, no stored K/V needed
            with inj.paused():
                guided = unet(z, 300, emb).sample  # step 1, layout branch alone (Eq. 5.10)
            both = unet(DualBranchInjector.bifurcate(z), 300, emb.expand(2, -1, -1)).sample
            assert inj.step == 1
    assert torch.allclose(early, plain_600, atol=1e-5) and torch.allclose(guided, plain_300, atol=1e-5)
    lay, sty = split_branches(both)
    assert torch.allclose(lay, plain_300, atol=1e-5) and not torch.allclose(sty, plain_300, atol=1e-3)
    with pytest.raises(ValueError, match="bifurcation_step"):
        DualBranchInjector(unet, rec.store, bifurcation_step=-1)


# -- Prompt-to-Prompt: only the layers it edits ------------------------------------------------------------


def test_prompt_to_prompt_swaps_only_the_layers_it_edits(unet):
    from ctrlgen.attention import PromptToPrompt

    before = dict(unet.attn_processors)
    align = [(torch.arange(7), torch.ones(7))]

    def swapped(**kw):
        with PromptToPrompt(unet, align, num_steps=10, **kw):
            now = unet.attn_processors
            return {k.removesuffix(".processor") for k in now if now[k] is not before[k]}

    cross = {l.name for l in attention_layers(unet) if l.kind == "cross"}
    self8 = {l.name for l in select_layers(unet, "self", [8])}
    assert swapped(self_max_pixels=8 * 8) == cross | self8  # 16x16 self-attention (256 queries) left alone
    assert swapped(self_replace_fraction=0.0) == cross
    assert swapped(cross_replace_fraction=0.05, self_replace_fraction=0.0) == set()  # ⌊0.05·10⌋ = 0 steps
    assert all(unet.attn_processors[k] is before[k] for k in before)


def test_prompt_to_prompt_step_from_the_hook_equals_the_step_set_by_the_loop(unet):
    from ctrlgen.attention import PromptToPrompt

    g = torch.Generator().manual_seed(7)
    z, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    align = [(torch.tensor([0, 1, 2, 2, 3, 4, 5]), torch.tensor([1.0, 1, 1, 0, 1, 1, 1]))]
    outs = {}
    with torch.no_grad():
        for mode in ("hook", "loop"):
            with PromptToPrompt(unet, align, num_steps=3, cross_replace_fraction=0.5) as p2p:
                for i, t in enumerate((900, 500, 100)):
                    if mode == "loop":
                        p2p.step = i
                    outs[mode, i] = unet(z, t, emb).sample
        plain = unet(z, 500, emb).sample
        with pytest.raises(RuntimeError, match="latent_size"), PromptToPrompt(unet, align, num_steps=3):
            unet(torch.randn(2, 4, 8, 8), 10, emb)
    assert all(torch.equal(outs["hook", i], outs["loop", i]) for i in range(3))
    assert torch.allclose(outs["hook", 1], plain, atol=1e-5)  # ⌊0.5·3⌋ = 1: step 1 is no longer edited
    with torch.no_grad():
        unedited = unet(z, 900, emb).sample
    assert not torch.allclose(outs["hook", 0][1], unedited[1], atol=1e-4)  # step 0 is
