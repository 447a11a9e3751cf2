"""IP-Adapter baseline (§5.5.1; Ye et al., 2023) on a tiny random mini model.

The decoupled cross-attention by hand (text attention + λ · attention over the image tokens, Eq. 5 of Ye et al.);
λ = 0 gives the base U-Net exactly; W'_k, W'_v start as the text W_k, W_v; classifier-free guidance batches get the
zero embedding's tokens on their unconditional half; training changes only the adapter (the base U-Net frozen) and
makes the image prompt matter; bad input is refused.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ctrlgen.methods.baselines.ip_adapter as ipa
from ctrlgen.config import load_profile
from ctrlgen.models import build_caption_tokenizer, build_mini_components

SIDE = 32
PROMPT = "a lesion on skin"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int = 0):
    cfg = load_profile("smoke", {"models.image_size": SIDE, "models.mini.text_encoder.max_length": 24})
    tok = build_caption_tokenizer([PROMPT], model_max_length=24)
    return build_mini_components(cfg, tok, seed=seed)


def images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.full((n, SIDE, SIDE, 3), (220, 180, 160), np.uint8)
    for i in range(n):
        y, x = rng.integers(4, 20, 2)
        out[i, y:y + 8, x:x + 8] = (90, 50, 30) if i % 2 else (30, 60, 150)
    return out


def inputs(model, n: int = 2):
    g = torch.Generator().manual_seed(0)
    side = model.unet.config.sample_size
    return (torch.randn(n, model.unet.config.in_channels, side, side, generator=g), torch.tensor([500] * n),
            model.encode_prompt([PROMPT] * n).detach())


def test_decoupled_cross_attention_by_hand_and_lambda_zero_is_the_base_unet():
    model = tiny()
    adapter = ipa.IPAdapter(model.unet, embed_dim=5, tokens=3)
    layer = adapter.layers[0]
    attn = layer.module
    assert torch.equal(adapter.to_k_ip[ipa.IPAdapter.key(layer.name)].weight, attn.to_k.weight)  # copied init
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    text = torch.randn(2, 7, attn.to_k.in_features)
    embeds = torch.randn(2, 5)
    swap = ipa.IPAdapterSwap(model.unet, adapter, scale=0.7)
    swap.set_embeds(embeds)
    proc = ipa.IPAttnProcessor(layer, swap)
    with torch.no_grad():
        got = proc(attn, hidden, text)

        def heads_attention(q, k, v):
            split = lambda x: x.view(2, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
            w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // attn.heads) ** 0.5, -1)
            return (w @ split(v)).transpose(1, 2).reshape(2, -1, q.shape[-1])
        q = attn.to_q(hidden)
        c = adapter.norm(adapter.proj(embeds).view(2, 3, -1))
        k_ip = adapter.to_k_ip[ipa.IPAdapter.key(layer.name)](c)
        v_ip = adapter.to_v_ip[ipa.IPAdapter.key(layer.name)](c)
        z = heads_attention(q, attn.to_k(text), attn.to_v(text)) + 0.7 * heads_attention(q, k_ip, v_ip)
        want = attn.to_out[1](attn.to_out[0](z))
    assert torch.allclose(got, want, atol=1e-5)
    x, t, emb = inputs(model)
    with torch.no_grad():
        base = model.unet(x, t, encoder_hidden_states=emb).sample
        with ipa.IPAdapterSwap(model.unet, adapter, scale=0.0) as off:
            wrapped = ipa.ImagePromptedUNet(model.unet, adapter, off, lambda im: im.mean((2, 3)).repeat(1, 2)[:, :5])
            same = wrapped.prompt(torch.rand(2, 3, SIDE, SIDE))(x, t, emb).sample
    assert torch.equal(base, same)


def test_cfg_batches_get_the_zero_embeddings_tokens_first():
    model = tiny()
    adapter = ipa.IPAdapter(model.unet, embed_dim=4)
    swap = ipa.IPAdapterSwap(model.unet, adapter)
    swap.set_embeds(torch.randn(3, 4))
    both = swap.tokens_for(6)
    assert torch.equal(both[3:], swap.tokens) and torch.equal(both[:3], adapter.image_tokens(torch.zeros(3, 4)))
    with pytest.raises(RuntimeError, match="image prompts for a batch of 3"):
        swap.tokens_for(4)


def test_training_changes_only_the_adapter_and_the_image_prompt_then_matters():
    model = tiny()
    frozen = {k: v.clone() for k, v in model.unet.state_dict().items()}
    embed = ipa.vae_image_embedder(model.vae, grid=2)
    dim = int(embed(torch.rand(1, 3, SIDE, SIDE)).shape[1])
    config = ipa.IPAdapterConfig(train_steps=6, batch_size=4, lr=1e-2, tokens=2)
    adapter = ipa.train_ip_adapter(model, images(8), PROMPT, config, embed, dim, seed=0)
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in frozen.items())
    start = ipa.IPAdapter(model.unet, dim, 2)
    key = ipa.IPAdapter.key(adapter.layers[0].name)
    assert not torch.equal(adapter.to_k_ip[key].weight, start.to_k_ip[key].weight)
    prompts = torch.from_numpy(images(2, seed=3)).permute(0, 3, 1, 2).float() / 255
    out = ipa.ip_adapter_generate(model, adapter, prompts, PROMPT, embed, num_steps=2, guidance_scale=2.0, seed=0)
    same_noise = ipa.ip_adapter_generate(model, adapter, prompts.flip(0), PROMPT, embed, num_steps=2,
                                         guidance_scale=2.0, seed=0)
    assert out.shape == (2, 3, SIDE, SIDE) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert not torch.allclose(out, same_noise)  # swapping the image prompts changes the images


def test_bad_input_is_refused():
    model = tiny()
    embed = ipa.vae_image_embedder(model.vae, grid=2)
    with pytest.raises(ValueError, match="base model draws 32 px"):
        ipa.train_ip_adapter(model, np.zeros((2, 16, 16, 3), np.uint8), PROMPT, ipa.IPAdapterConfig(), embed, 16)
    with pytest.raises(ValueError, match="one prompt"):
        ipa.train_ip_adapter(model, images(2), [PROMPT] * 3, ipa.IPAdapterConfig(), embed, 16)
    with pytest.raises(ValueError, match="tokens >= 1"):
        ipa.IPAdapter(model.unet, 4, tokens=0)
    with pytest.raises(RuntimeError, match="prompt"):
        adapter = ipa.IPAdapter(model.unet, 4)
        with ipa.IPAdapterSwap(model.unet, adapter) as swap:
            ipa.ImagePromptedUNet(model.unet, adapter, swap, embed)(*inputs(model))


# ---------------------------------------------------------------- the U-Net facade and the training target
def test_image_prompted_unet_sets_the_image_tokens_then_calls_the_wrapped_unet():
    """The facade by hand: the swap's image tokens set from the embedded prompts, then the wrapped U-Net called as
    is; config, dtype and device of the U-Net (through a ``ControlledUNet`` too); no call before ``prompt``."""
    from ctrlgen.methods.baselines.controlnet import ControlledUNet, build_controlnet
    from ctrlgen.methods.baselines.unet_wrapper import ConditionedUNet

    torch.manual_seed(0)
    model = tiny()
    adapter = ipa.IPAdapter(model.unet, embed_dim=5, tokens=3)
    with torch.no_grad():  # W'_k apart from W_k, so that the image prompt matters
        for p in adapter.to_k_ip.parameters():
            p.normal_(0, 0.3)
    embed = lambda im: im.mean((2, 3)).repeat(1, 2)[:, :5]  # noqa: E731
    prompts = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    x, t, emb = inputs(model)
    with torch.no_grad():
        base = model.unet(x, t, encoder_hidden_states=emb).sample
        with ipa.IPAdapterSwap(model.unet, adapter, scale=0.8) as swap:
            wrapped = ipa.ImagePromptedUNet(model.unet, adapter, swap, embed)
            with pytest.raises(RuntimeError, match=r"ImagePromptedUNet: call prompt\(images\) before the U-Net"):
                wrapped(x, t, emb)
            got = wrapped.prompt(prompts)(x, t, emb).sample
            swap.tokens = swap.uncond = None
            swap.set_embeds(embed(prompts))
            want = model.unet(x, t, encoder_hidden_states=emb).sample
    assert torch.equal(got, want) and not torch.allclose(got, base)
    assert isinstance(wrapped, ConditionedUNet) and wrapped.images is prompts
    nested = ipa.ImagePromptedUNet(ControlledUNet(model.unet, build_controlnet(model)), adapter, swap, embed)
    for facade in (wrapped, nested):
        assert facade.config is model.unet.config and facade.dtype == model.unet.dtype
        assert facade.device == model.unet.device == torch.device("cpu")


def test_ip_adapter_trains_against_the_v_prediction_target_of_the_base_models_schedule(monkeypatch):
    """The mini base models predict v: IP-Adapter's loss compares with v from the scheduler, never with ε."""
    from test_baselines_controlnet import assert_velocity_targets, record_training_targets

    model = tiny()
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    seen = record_training_targets(monkeypatch)
    embed = ipa.vae_image_embedder(model.vae, grid=2)
    dim = int(embed(torch.rand(1, 3, SIDE, SIDE)).shape[1])
    ipa.train_ip_adapter(model, images(4), PROMPT, ipa.IPAdapterConfig(train_steps=2, batch_size=2, tokens=2), embed,
                         dim, seed=0)
    assert_velocity_targets(seen, 2)
