"""Training loop: parameter selection, losses reaching the right weights, checkpoint/resume, VAE."""
from __future__ import annotations

import pytest
import torch

import ctrlgen.training.loop as training_loop
from ctrlgen.attention.layers import select_layers
from ctrlgen.config import load_profile
from ctrlgen.models import add_placeholder_tokens, build_caption_tokenizer, build_mini_components, locate_tokens
from ctrlgen.training import (
    AttentionAlignmentTerm,
    SelfAttentionStructureTerm,
    TrainConfig,
    VAETrainConfig,
    latest_checkpoint,
    select_trainable,
    train_diffusion,
    train_vae,
)

PROMPT = "an image of <lesion> on <skin>"


def tiny_model():
    cfg = load_profile("smoke", {"models.image_size": 64, "attention.cross_res": [16], "attention.self_res": [16],
                                 "attention.train_cross_res": [16, 8]})  # 16x16 latent, U-Net (32, 64)
    tok = build_caption_tokenizer(["an image of a small dark lesion on skin"], model_max_length=16)
    model = build_mini_components(cfg, tok)
    tokens = add_placeholder_tokens(tok, model.text_encoder, ["<lesion>", "<skin>"], ["lesion", "skin"])
    return model, tokens


def batches(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = model.tokenize([PROMPT] * n)
    pos = locate_tokens(model.tokenizer, ids, ["<lesion>", "<skin>"]).positions[0].tolist()
    mask = torch.zeros(n, 1, 64, 64)
    mask[:, :, 16:48, 20:44] = 1
    out = []
    for _ in range(3):
        out.append({"latents": torch.randn(n, 4, 16, 16, generator=g), "input_ids": ids, "mask": mask,
                    "token_indices": torch.tensor([pos] * n), "token_masks": torch.cat([mask, 1 - mask], 1)})
    return out


def test_custom_diffusion_selection_and_region_loss_step():
    model, _ = tiny_model()
    tp = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion")
    assert tp.named and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in tp.named)
    frozen = {n: p.detach().clone() for n, p in model.unet.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in tp.named.items()}
    res = train_diffusion(model, batches(model), TrainConfig(steps=3, lr=1e-3, cross_res=(16, 8), progress=False),
                          tp, [AttentionAlignmentTerm(weight=0.1)])
    assert res.steps == 3 and all(set(h) >= {"loss", "rec", "attn"} for h in res.history)
    for h in res.history:
        assert abs(h["loss"] - (h["rec"] + 0.1 * h["attn"])) < 1e-5
    assert any(not torch.equal(before[n], p) for n, p in tp.named.items())
    assert all(torch.equal(frozen[n], p) for n, p in model.unet.named_parameters() if n in frozen)
    assert len(model.unet._forward_pre_hooks) == 0


def test_token_rows_only_and_lora():
    model, tokens = tiny_model()
    emb = model.text_encoder.get_input_embeddings().weight
    before = emb.detach().clone()
    tp = select_trainable(model.unet, model.text_encoder, mode="lora", lora_rank=2, token_ids=tokens.ids)
    assert any("lora_" in n for n in tp.named) and all(("lora_" in n) or n.startswith("text_encoder.") for n in tp.named)
    train_diffusion(model, batches(model), TrainConfig(steps=2, lr=1e-2, progress=False), tp)
    changed = (emb.detach() != before).any(-1).nonzero().flatten().tolist()
    assert changed == sorted(tokens.ids)
    tp.remove_hooks()


def test_checkpoint_resume_is_identical(tmp_path):
    def run(steps, out, resume=True):
        model, _ = tiny_model()
        tp = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion")
        cfg = TrainConfig(steps=steps, lr=1e-3, checkpoint_every=2, output_dir=str(out), resume=resume,
                          self_res=(16,), self_places=("down",), progress=False)
        train_diffusion(model, batches(model), cfg, tp, [SelfAttentionStructureTerm(weight=0.3)])
        return {n: p.detach().clone() for n, p in tp.named.items()}

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-0000002"
    resumed = run(4, tmp_path / "b")
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-0000004"
    assert all(torch.allclose(straight[n], resumed[n], atol=1e-6) for n in straight)
    assert not list((tmp_path / "b").glob(".checkpoint-*"))  # no temporary folders left


def test_train_vae_sets_latent_scale():
    cfg = load_profile("smoke")
    model = build_mini_components(cfg, build_caption_tokenizer(["a b"]))
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.rand(4, 3, 32, 32, generator=g) * 2 - 1} for _ in range(2)]
    res = train_vae(model.vae, data, VAETrainConfig(steps=3, progress=False), scale_batches=2)
    with torch.no_grad():
        z = torch.cat([model.vae.encode(b["pixel_values"]).latents.flatten() for b in data])  # AutoencoderTiny: deterministic
    assert res.scaling_factor == model.vae.config.scaling_factor
    assert abs(res.scaling_factor - 1 / z.std().item()) < 1e-4 * res.scaling_factor


def test_train_config_from_merges_with_train_config_winning_and_names_unknown_keys():
    from ctrlgen.training import train_config_from

    tc = train_config_from({"steps": 10, "lr": 1e-5, "seed": 3}, {"lr": 2e-4, "mixed_precision": "bf16", "betas": [0.8, 0.99]})
    assert (tc.steps, tc.lr, tc.seed, tc.mixed_precision, tc.betas) == (10, 2e-4, 3, "bf16", (0.8, 0.99))
    assert train_config_from({"steps": 10}, None) == TrainConfig(steps=10)
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['learning_rate'\].*lr"):
        train_config_from({"steps": 1}, {"learning_rate": 1.0})


def test_adamw_gets_the_configured_betas_and_eps(monkeypatch):
    import ctrlgen.training.loop as loop

    seen = {}
    real = torch.optim.AdamW

    class Spy(real):
        def __init__(self, params, **kw):
            seen.update(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(loop.torch.optim, "AdamW", Spy)
    model, _ = tiny_model()
    tp = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion")
    train_diffusion(model, batches(model), TrainConfig(steps=1, lr=1e-3, betas=(0.7, 0.95), eps=1e-6, progress=False), tp)
    assert seen["betas"] == (0.7, 0.95) and seen["eps"] == 1e-6 and seen["lr"] == 1e-3


def test_resume_restores_the_ema_warm_up_too(tmp_path):
    """With EMA, an interrupted-and-resumed run ends on the same (EMA) weights as a straight one: the EMA's own
    step count (its warm-up decay) is checkpointed too, not restarted at 0."""
    def run(steps, out):
        model, _ = tiny_model()
        tp = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion")
        cfg = TrainConfig(steps=steps, lr=1e-3, checkpoint_every=2, output_dir=str(out), ema_decay=0.99,
                          noise_offset=0.1, progress=False)
        train_diffusion(model, batches(model), cfg, tp)
        return {n: p.detach().clone() for n, p in tp.named.items()}

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "b")
    assert all(torch.allclose(straight[n], resumed[n], atol=1e-6) for n in straight)


def test_noise_offset_adds_one_constant_per_sample_and_channel(monkeypatch):
    """diffusers' --noise_offset: the training noise is N(0, I) + offset·N(0, 1) per (sample, channel)."""
    from diffusers import DDPMScheduler

    seen = []
    original = DDPMScheduler.add_noise

    def spy(self, latents, noise, t):
        seen.append(noise.detach().clone())
        return original(self, latents, noise, t)

    monkeypatch.setattr(DDPMScheduler, "add_noise", spy)
    for offset in (0.0, 0.5):
        model, _ = tiny_model()
        tp = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion")
        train_diffusion(model, batches(model), TrainConfig(steps=1, noise_offset=offset, progress=False), tp)
    plain, offset = seen
    delta = offset - plain
    per_channel = delta.mean((-2, -1), keepdim=True)
    assert torch.allclose(delta, per_channel.expand_as(delta), atol=1e-6)  # constant over H, W
    assert per_channel.abs().min() > 0 and per_channel.std() > 0.05     # one draw per (sample, channel)


def _grads_of_one_step(checkpointing: bool, attn_weight: float, monkeypatch):
    """Loss, per-parameter gradients and the capture's per-side counts of one step (the same seed, data and model)."""
    stores = []

    class Recorded(training_loop.AttentionCapture):
        def __enter__(self):
            stores.append(super().__enter__())
            return stores[-1]

    monkeypatch.setattr(training_loop, "AttentionCapture", Recorded)
    model, _ = tiny_model()
    tp = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion")
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.detach().clone()))
             for n, p in tp.named.items()]
    res = train_diffusion(model, batches(model)[:1], TrainConfig(steps=1, lr=1e-3, cross_res=(16, 8), progress=False,
                                                                 gradient_checkpointing=checkpointing),
                          tp, [AttentionAlignmentTerm(weight=attn_weight)])
    for h in hooks:
        h.remove()
    assert not model.unet.is_gradient_checkpointing  # the run's setting is put back afterwards
    counts = {r: stores[0].count("cross", r) for r in (16, 8)}
    return res.history[0], grads, counts, model


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_records_each_map_once(monkeypatch):
    plain, g_plain, c_plain, model = _grads_of_one_step(False, 0.1, monkeypatch)
    ckpt, g_ckpt, c_ckpt, _ = _grads_of_one_step(True, 0.1, monkeypatch)
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6) and ckpt["attn"] == pytest.approx(plain["attn"], rel=1e-6)
    assert set(g_ckpt) == set(g_plain) and g_plain
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-7)
    # each captured layer adds its map once per U-Net call: the count is the number of layers of that side,
    # also when the backward pass recomputes the checkpointed blocks (and their attention processors)
    want = {r: len(select_layers(model.unet, "cross", (r,), ("down", "mid", "up"), (16, 16))) for r in (16, 8)}
    assert c_plain == want and c_ckpt == want and all(want.values())
    # L_attn reaches W_k/W_v under checkpointing: its weight changes the gradients
    _, g_no_attn, _, _ = _grads_of_one_step(True, 0.0, monkeypatch)
    assert any(not torch.allclose(g_no_attn[n], g_ckpt[n]) for n in g_ckpt)


def test_gradient_checkpointing_is_refused_for_a_backbone_without_it():
    with pytest.raises(ValueError, match="Linear holds no diffusers model"):
        with training_loop.gradient_checkpointing(torch.nn.Linear(2, 2), True):
            pass
