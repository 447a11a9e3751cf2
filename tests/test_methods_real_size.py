"""One real-size step of every method chapters 3–6 added, on the real SD 2.1-base / SD 1.4 architectures (slow).

Random weights (``build_from_published_config``), CPU float32, batch 1: each test runs the method's own entry
point for one step and checks shapes, finiteness and the method's key structural fact on the real layer
structure (attention sides 64/32/16/8, cross-attention width 1024 (SD 2.1) / 768 (SD 1.4), 16 cross-attention
layers, 9 decoder self-attention layers). Every test builds its own model and frees it (``gc``) before the next.

Measured on a shared 2-core machine (other jobs running; OMP_NUM_THREADS=1, ``nice``), each test alone (``-k``),
wall time of the pytest process / its peak RSS (``/usr/bin/time -v``), 2026-11-30:
  attencraft 59 s / 7.8 GB · custom_diffusion 44 s / 7.7 GB · disendiff 43 s / 7.8 GB · break_a_scene 67 s / 10.2 GB
  dual_branch (32x32 latent) 54 s / 6.5 GB · controlnet 86 s / 12.6 GB · ip_adapter 80 s / 8.4 GB
  zestguide 46 s / 7.9 GB · attention_refocusing 48 s / 8.2 GB
  cxr_irgen U-Net (the no-AdamW branch: < 24 GiB free) 48 s / 9.9 GB · cxr_irgen U-ViT 17 s / 2.6 GB
  gradient checkpointing (two steps) 52 s / 7.7 GB — about 11 minutes for the module. Alone, one 512 px
  W_k/W_v step of SD 2.1 grows the process by 1.78 GB of activations, 0.87 GB with gradient checkpointing (+33% time). The ControlNet test skips with less than 14 GiB free memory.
"""
from __future__ import annotations

import dataclasses
import gc

import numpy as np
import psutil
import pytest
import torch

from ctrlgen.attention import AttentionCapture, available_resolutions
from ctrlgen.attention.layers import attention_layers
from ctrlgen.config import load_profile
from ctrlgen.methods.attencraft import AttenCraftConfig, MaskSettings, attencraft_finetune
from ctrlgen.methods.baselines import controlnet as cn
from ctrlgen.methods.baselines import ip_adapter as ipa
from ctrlgen.methods.baselines.attention_refocusing import RefocusConfig, refocus_refiner
from ctrlgen.methods.baselines.break_a_scene import BreakASceneConfig, break_a_scene_finetune
from ctrlgen.methods.baselines.custom_diffusion import CustomDiffusionConfig, custom_diffusion_finetune
from ctrlgen.methods.baselines.disendiff import DisenDiffConfig, disendiff_finetune
from ctrlgen.methods.baselines.zestguide import ZestGuideConfig, zestguide_refiner
from ctrlgen.methods.cxr_irgen import UViT, build_conditions, finetune_backbone
from ctrlgen.methods.didgen import setup_placeholders
from ctrlgen.methods.dual_branch import DualBranchConfig, DualBranchGenerator, invert_style
from ctrlgen.models import build_caption_tokenizer, build_from_published_config, locate_tokens
from ctrlgen.sampling import sample
from ctrlgen.training import AttentionAlignmentTerm, TrainConfig, reconstruction_loss, select_trainable, train_diffusion

pytestmark = pytest.mark.slow

CAPTIONS = ["a photo of a cat and a dog on a wooden table in a sunny kitchen",
            "an image of a small dark lesion on skin", "a chest x-ray image with cardiomegaly and pleural effusion",
            "a painting of a mountain village beneath enormous clouds"]
CLASSES = ["cat", "dog"]
GIB = 2 ** 30


@pytest.fixture(autouse=True)
def _free_memory():
    """Each test's model goes before the next test builds its own (peak memory: one real model at a time)."""
    yield
    gc.collect()


def real(arch: str = "sd21_base", latent_side: int | None = None):
    """The real architecture with random weights and a CLIP-format tokenizer of 77 positions; ``latent_side``
    shrinks the latent (the U-Net's ``sample_size``) where 64x64 is too slow on this CPU — the layers stay real."""
    model = build_from_published_config(arch, build_caption_tokenizer(CAPTIONS, model_max_length=77))
    if latent_side is not None:
        model.unet.register_to_config(sample_size=latent_side)
    return model


def fingerprints(module: torch.nn.Module) -> dict[str, tuple[float, torch.Tensor]]:
    """A cheap per-parameter fingerprint (the float64 sum and the first entries): a full copy of a real U-Net
    would double the test's memory."""
    return {n: (float(p.detach().double().sum()), p.detach().flatten()[:64].clone()) for n, p in module.named_parameters()}


def changed(module: torch.nn.Module, before: dict[str, tuple[float, torch.Tensor]]) -> set[str]:
    """The parameters among ``before``'s whose fingerprint moved."""
    now = fingerprints(module)
    return {n for n, (s, head) in before.items() if now[n][0] != s or not torch.equal(now[n][1], head)}


def is_kv(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def n_layers(unet: torch.nn.Module, kind: str, place: str | None = None) -> int:
    return sum(1 for layer in attention_layers(unet)
               if layer.kind == kind and (place is None or layer.name.startswith(place)))


def latent(side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(seed))


def disk(side: int, r: float = 0.3) -> torch.Tensor:
    yy, xx = np.mgrid[:side, :side]
    return torch.from_numpy(((yy - side / 2) ** 2 + (xx - side / 2.5) ** 2 < (r * side) ** 2).astype(np.float32))


# ============================================================================================== chapter 3
def test_attencraft_stage_one_masks_and_a_stage_two_step_on_sd21():
    """Stage I at the thesis's sides (A_C 16x16, A_S 32x32 of a 64x64 latent) for two concepts, one Stage II step
    that moves W_k/W_v of the 16 cross-attention layers only."""
    model = real()
    assert available_resolutions(model.unet, "cross") == [64, 32, 16, 8]
    before = fingerprints(model.unet)
    cfg = AttenCraftConfig(steps=1, lr=1e-5, cross_res=(16,), masks=MaskSettings(score_timesteps=(0,)))
    res = attencraft_finetune(model, latent(), CLASSES, cfg)
    st = res.stage
    assert st.cross.shape == (2, 16, 16) and st.self_attn.shape == (1024, 1024)
    torch.testing.assert_close(st.self_attn.sum(-1), torch.ones(1024), rtol=0, atol=1e-4)  # rows of A_S sum to 1
    assert st.masks.shape == (2, 32, 32) and st.masks.dtype == torch.bool and st.masks.sum(0).max() <= 1  # disjoint
    assert st.scores.shape == (2,) and torch.isfinite(st.scores).all() and res.ratios.sum() == pytest.approx(1.0)
    h = res.train.history[0]
    assert np.isfinite(h["loss"]) and np.isfinite(h["attn"])
    moved = changed(model.unet, before)
    assert moved and all(is_kv(n) for n in moved)
    assert set(res.state) == {f"unet.{n}" for n, _ in model.unet.named_parameters() if is_kv(n)}
    assert len(res.state) == 2 * n_layers(model.unet, "cross") == 32
    assert all(t.shape[1] == 1024 for t in res.state.values())  # W_k, W_v read SD 2.1's 1024-wide text tokens


def test_custom_diffusion_step_on_sd21():
    model = real()
    before = fingerprints(model.unet)
    res = custom_diffusion_finetune(model, latent(), CLASSES, CustomDiffusionConfig(steps=1, lr=1e-5))
    assert res.train.steps == 1 and np.isfinite(res.train.history[0]["loss"])
    assert res.custom.prompt((0, 1)) == "a photo of <v1> cat and <v2> dog"
    moved = changed(model.unet, before)
    assert moved and all(is_kv(n) for n in moved) and len(res.state) == 32


def test_disendiff_step_on_sd21():
    model = real()
    before = fingerprints(model.unet)
    res = disendiff_finetune(model, latent(), CLASSES, DisenDiffConfig(steps=1, lr=1e-5))
    h = res.train.history[0]
    assert np.isfinite(h["loss"]) and h["loss"] == pytest.approx(h["rec"] + h["calibration"], abs=1e-5)
    assert 0 <= h["calibration"] <= 2  # L_bind ∈ [0, 1] on min-max maps, L_sep ∈ [0, 1/2]
    moved = changed(model.unet, before)
    assert moved and all(is_kv(n) for n in moved)


def test_break_a_scene_both_stages_on_sd21():
    """Stage 1 (the <v_i> rows only) then stage 2 (the text encoder and W_k/W_v), one step each, with masks."""
    model = real()
    before_u = fingerprints(model.unet)
    # the embedding matrix grows by the two <v_i> rows: every other text-encoder tensor is compared
    before_t = {n: f for n, f in fingerprints(model.text_encoder).items() if "embed_tokens" not in n}
    masks = np.zeros((2, 512, 512), bool)
    masks[0, :, :220], masks[1, :, 290:] = True, True
    res = break_a_scene_finetune(model, latent(), CLASSES, masks, BreakASceneConfig(ti_steps=1, steps=1))
    assert [h["step"] for h in res.train.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and 0 <= h["attn"] <= 1 for h in res.train.history)
    moved = changed(model.unet, before_u)
    assert moved and all(is_kv(n) for n in moved)
    assert len(changed(model.text_encoder, before_t)) > 1  # stage 2 trains the text encoder


# ============================================================================================== chapter 5
def test_dual_branch_inversion_and_a_batched_two_branch_step_on_sd21():
    """DDIM inversion of a reference for T = 2 steps, then Algorithm 3 with B = 1: one joint step, one batched
    two-branch step. 32x32 latent (256 px): at 64x64 the six U-Net calls (two with a backward pass) and the two
    VAE decodes take several minutes on this CPU; the U-Net's layers are SD 2.1's."""
    model = real(latent_side=32)
    setup_placeholders(model)
    config = DualBranchConfig.from_profile(load_profile("full"), num_steps=2, cross_res=8, self_res=16)
    assert config.kv_places == ("up",) and config.bifurcation_step == 1
    ref = invert_style(model, torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0)),
                       "an image of <lesion> on <skin>", config)
    decoder_self = n_layers(model.unet, "self", "up_blocks")
    assert decoder_self == 9  # SD 2.1's decoder: 3 up blocks with attention x 3 transformer layers
    assert len(ref.timesteps) == 2 and ref.kv_count() == 2 * decoder_self
    k, v = next(iter(ref.kv.data[ref.timesteps[0]].values()))
    assert k.shape[0] == 1 and k.shape[-1] in (320, 640, 1280) and torch.isfinite(k).all() and torch.isfinite(v).all()
    out = DualBranchGenerator(model, config).generate(ref, disk(256)[None].numpy() > 0, "an image of <lesion> on <skin>")
    assert out.images.shape == out.layout_images.shape == (1, 3, 256, 256) and out.masks.shape == (1, 256, 256)
    assert torch.isfinite(out.images).all() and 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    assert out.passes == {"denoising": 2, "guidance": 2, "annotation": 1}  # T passes, not 2T
    assert out.rows["denoising"] == 2 + 4  # [uncond; cond] before B, [uncond; cond] x [layout, style] after


def test_controlnet_from_the_real_unet_is_the_identity_then_one_training_step_on_sd21():
    need = 14 * GIB  # the ControlNet's AdamW state (2 x 1.4 GB) on top of the frozen SD 2.1 parts
    if psutil.virtual_memory().available < need:
        pytest.skip(f"needs {need / GIB:.0f} GiB of free memory, {psutil.virtual_memory().available / GIB:.1f} free")
    model = real()
    net = cn.build_controlnet(model)
    assert tuple(net.config.conditioning_embedding_out_channels) == cn.CONDITIONING_CHANNELS  # 512 px -> 64 latent
    mask = (disk(512) > 0).numpy()[None]
    cond = cn.conditioning_images(mask, 512)
    z, t = latent(), torch.tensor([500])
    with torch.no_grad():
        emb = model.encode_prompt(["a photo of a cat"])
        base = model.unet(z, t, encoder_hidden_states=emb).sample
        out = cn.ControlledUNet(model.unet, net).condition(cond)(z, t, encoder_hidden_states=emb).sample
    assert torch.equal(out, base)  # zero convolutions: the untrained ControlNet leaves SD 2.1's output unchanged
    del net, base, out
    gc.collect()
    before = fingerprints(model.unet)
    image = (np.random.default_rng(0).random((1, 512, 512, 3)) * 255).astype(np.uint8)
    trained = cn.train_controlnet(model, image, mask, "a photo of a cat", cn.ControlNetConfig(train_steps=1, batch_size=1),
                                  progress=False)
    assert not changed(model.unet, before)  # the base U-Net stays frozen
    zero_conv = trained.controlnet_down_blocks[0].weight
    assert zero_conv.abs().max() > 0  # one AdamW step moved the zero convolutions off zero


def test_ip_adapter_step_on_sd21():
    """One training step of the projection and W'_k/W'_v on SD 2.1 (the image encoder: the VAE stand-in pooled
    to 16x16x4 = 1024 values, the width of OpenCLIP-H's image embedding), then one U-Net call with the prompt."""
    model = real()
    embed = ipa.vae_image_embedder(model.vae, grid=16)
    image = (np.random.default_rng(0).random((1, 512, 512, 3)) * 255).astype(np.uint8)
    before = fingerprints(model.unet)
    adapter = ipa.train_ip_adapter(model, image, "a photo of a cat", ipa.IPAdapterConfig(train_steps=1, batch_size=1),
                                   embed, embed_dim=1024)
    assert not changed(model.unet, before)
    assert len(adapter.layers) == n_layers(model.unet, "cross") == 16 and adapter.dim == 1024
    assert all(lin.in_features == 1024 for lin in adapter.to_k_ip.values())
    pix = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        assert adapter.image_tokens(embed(pix)).shape == (1, 4, 1024)
        emb = model.encode_prompt(["a photo of a cat"])
        with ipa.IPAdapterSwap(model.unet, adapter) as swap:
            out = ipa.ImagePromptedUNet(model.unet, adapter, swap, embed).prompt(pix)(latent(), 500, emb).sample
        base = model.unet(latent(), 500, encoder_hidden_states=emb).sample
    assert out.shape == (1, 4, 64, 64) and torch.isfinite(out).all() and not torch.equal(out, base)


# ============================================================================================== chapter 4
def _guided_step(model, refiner):
    prompt = "an image of <lesion> on <skin>"
    ids = model.tokenize([prompt])
    loc = locate_tokens(model.tokenizer, ids, ["<lesion>", "<skin>"])
    with torch.no_grad():
        cond, uncond = model.encode_prompt([prompt]), model.encode_prompt([""])
    guide = refiner(loc.positions[0].tolist(), int(loc.ends[0]))
    out = sample(model.unet, model.scheduler("ddim"), latent(), cond, uncond, num_steps=1, guidance_scale=7.5,
                 refine=guide, progress=False)
    assert out.latents.shape == (1, 4, 64, 64) and torch.isfinite(out.latents).all()
    return guide


def test_zestguide_guided_step_on_sd21():
    model = real()
    setup_placeholders(model)
    mask = disk(512)[None]
    cfg = dataclasses.replace(ZestGuideConfig.from_profile(load_profile("full")), fraction=1.0)
    assert cfg.cross_res == 16
    guide = _guided_step(model, lambda pos, last: zestguide_refiner(mask, pos[0], pos[1], cfg))
    assert len(guide.history) == 1 and 0 <= guide.history[0]["zest"] <= 2  # two segments, each in [0, 1]


def test_attention_refocusing_guided_step_on_sd21():
    model = real()
    setup_placeholders(model)
    mask = disk(512)[None]
    cfg = dataclasses.replace(RefocusConfig.from_profile(load_profile("full")), fraction=1.0)
    assert (cfg.cross_res, cfg.self_res) == (16, 32)
    guide = _guided_step(model, lambda pos, last: refocus_refiner(mask, pos[0], last, cfg))
    h = guide.history[0]
    assert 0 <= h["car"] <= 1.5 and h["sar"] >= 0 and np.isfinite(h["loss"])


# ============================================================================================== chapter 6
def test_cxr_irgen_rie_conditioned_unet_step_on_sd14():
    """Eq. (6.1) on SD 1.4: the reference embedding is the 78th token of the 768-wide condition. With enough memory
    the method's own step (``finetune_backbone``: the whole U-Net, AdamW); else the same loss and backward pass on
    every U-Net parameter without AdamW's 6.9 GB of state (860 M parameters; decided before the model is built)."""
    full_step = psutil.virtual_memory().available > 24 * GIB  # weights, gradients, AdamW state: ~14 GB, + activations
    model = real("sd14")
    assert model.text_encoder.config.hidden_size == model.unet.config.cross_attention_dim == 768
    prompt = ["A chest X-Ray image with cardiomegaly, without pleural effusion"]
    conds = build_conditions(model, prompt, torch.randn(1, 768), "concat")
    assert conds.cond.shape == (1, 78, 768) and conds.uncond.shape == (1, 78, 768)
    z = latent()
    with AttentionCapture(model.unet, cross_res=(16,)) as store, torch.no_grad():
        model.unet(z, 500, encoder_hidden_states=conds.cond)
    assert store.cross(16).shape == (1, 16, 16, 78)  # every cross-attention layer attends to the image token too
    if full_step:
        res = finetune_backbone(model, z, conds, steps=1, batch_size=1, lr=1e-5, dropout=0.0)
        assert res.steps == 1 and np.isfinite(res.history[0]["loss"])
        return
    model.unet.requires_grad_(True)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    noisy = model.noise_scheduler().add_noise(z, noise, t)
    loss = reconstruction_loss(model.unet(noisy, t, encoder_hidden_states=conds.cond).sample, noise)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.unet.named_parameters() if p.grad is None]
    assert not missing  # the whole U-Net trains (mode "full")
    kv = [p.grad for n, p in model.unet.named_parameters() if is_kv(n)]
    assert all(g.shape[1] == 768 and torch.isfinite(g).all() for g in kv)


def test_cxr_irgen_uvit_step_at_the_full_profiles_size():
    """The U-ViT backbone at the full profile's size (width 512, depth 12, 8 heads, patch 2: the book's U-ViT-M-like
    choice, the thesis names no size) on SD 1.4's 64x64 latent, with the ``mean`` combination of Eq. (6.1)."""
    u = load_profile("full").ch06.vision.uvit
    model = build_from_published_config("sd14", build_caption_tokenizer(CAPTIONS, model_max_length=77),
                                        parts=("vae", "text_encoder"))
    uvit = UViT(sample_size=64, in_channels=4, out_channels=4, patch_size=int(u.patch_size), width=int(u.width),
                depth=int(u.depth), heads=int(u.heads), cross_attention_dim=768, max_condition_tokens=78)
    assert uvit.n_patches == 1024 and len(uvit.in_blocks) == len(uvit.out_blocks) == 6
    model = dataclasses.replace(model, unet=uvit)
    conds = build_conditions(model, ["A chest X-Ray image with cardiomegaly"], torch.randn(1, 768), "mean")
    assert conds.cond.shape == (1, 77, 768)
    before = fingerprints(uvit)
    res = finetune_backbone(model, latent(), conds, steps=1, batch_size=1, lr=1e-5, dropout=0.0)
    assert res.steps == 1 and np.isfinite(res.history[0]["loss"])
    assert changed(uvit, before) == set(before)  # the whole backbone trains
    with torch.no_grad():
        assert uvit(latent(), 500, encoder_hidden_states=conds.cond).sample.shape == (1, 4, 64, 64)


# ============================================================================================== training loop
def test_gradient_checkpointing_gives_the_same_region_aware_step_on_sd21():
    """``TrainConfig.gradient_checkpointing`` on the real U-Net: the same L_rec + α L_attn step (Eq. 4.6) and the
    same W_k/W_v afterwards as without it, from the same start."""
    model = real()
    setup_placeholders(model)
    ids = model.tokenize(["an image of <lesion> on <skin>"])
    pos = locate_tokens(model.tokenizer, ids, ["<lesion>", "<skin>"]).positions[0].tolist()
    mask = disk(512)[None, None]
    batch = {"latents": latent(), "input_ids": ids, "mask": mask, "token_indices": torch.tensor([pos]),
             "token_masks": torch.cat([mask, 1 - mask], 1)}
    tp = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion")
    start = {n: p.detach().clone() for n, p in tp.named.items()}
    runs = []
    for on in (False, True):
        with torch.no_grad():
            for n, p in tp.named.items():
                p.copy_(start[n])
        res = train_diffusion(model, [batch], TrainConfig(steps=1, lr=1e-5, cross_res=(16,), progress=False,
                                                          gradient_checkpointing=on), tp, [AttentionAlignmentTerm(0.1)])
        runs.append((res.history[0], {n: p.detach().clone() for n, p in tp.named.items()}))
    (h0, w0), (h1, w1) = runs
    assert h1["loss"] == pytest.approx(h0["loss"], rel=1e-5) and h1["attn"] == pytest.approx(h0["attn"], rel=1e-5)
    assert all(torch.allclose(w1[n], w0[n], rtol=0, atol=1e-8) for n in w0)
    assert any(not torch.equal(w0[n], start[n]) for n in w0) and not model.unet.is_gradient_checkpointing
