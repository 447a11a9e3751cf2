"""Dual-branch controllable generation (§5.3.3, Algorithm 3) and its two-stage baseline on a tiny random model:
the batched two-branch step against the branches run one by one, plain generation when injection is off,
inversion → reconstruction against a trivial baseline, K/V bookkeeping, restoration after an exception,
Eq. (5.8) by hand, StyleID's formula by hand, pass counts, bad input, and the low-contrast targets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from skimage.color import rgb2lab

from ctrlgen.attention import DualBranchInjector, KVStore, interleave_branches, split_branches
from ctrlgen.attention.layers import AttentionLayer
from ctrlgen.config import load_profile
from ctrlgen.guidance import GuidanceContext, LayoutGuidanceSettings, StyleTerm
from ctrlgen.inversion import ddim_invert
from ctrlgen.methods.didgen import PairConfig, PairGenerator, setup_placeholders
from ctrlgen.methods.dual_branch import (
    DualBranchConfig,
    DualBranchGenerator,
    DualBranchResult,
    QueryRecorder,
    StyleIDInjector,
    invert_style,
    low_contrast_subset,
    single_branch_generate,
    style_targets,
    two_stage_generate,
)
from ctrlgen.methods.dual_branch.styleid import StyleIDProcessor
from ctrlgen.models import build_caption_tokenizer, build_mini_components
from ctrlgen.sampling import decode_images, predict_noise, sample, text_to_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "an image of <lesion> on <skin>"


@pytest.fixture(scope="module")
def cfg():
    return load_profile("smoke")


@pytest.fixture(scope="module")
def model(cfg):
    m = build_mini_components(cfg, build_caption_tokenizer(["an image of a small lesion on skin"], model_max_length=16))
    setup_placeholders(m)
    return m


@pytest.fixture(scope="module")
def config(cfg):
    return DualBranchConfig.from_profile(cfg)


@pytest.fixture(scope="module")
def reference(model, config):
    return invert_style(model, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), PROMPT, config)


def disks() -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    return np.stack([(yy - 16) ** 2 + (xx - 16) ** 2 < 64, (yy - 10) ** 2 + (xx - 20) ** 2 < 36])


def test_config_from_profile_carries_the_thesis_values(cfg):
    full = DualBranchConfig.from_profile(load_profile("full"))
    assert (full.lambda_attn, full.lambda_style, full.bifurcation_fraction, full.num_steps) == (1.0, 50.0, 0.5, 50)
    assert full.bifurcation_step == 25 and full.kv_places == ("up",) and full.tau == 4
    smoke = DualBranchConfig.from_profile(cfg)
    assert smoke.num_steps == cfg.sampling.inversion_steps and smoke.bifurcation_step == smoke.num_steps // 2
    with pytest.raises(ValueError, match="strictly between"):
        DualBranchConfig(num_steps=4, bifurcation_fraction=1.0)


def test_both_configs_hold_one_layout_guidance_settings_read_from_the_profile(cfg):
    """Review D6: ``PairConfig`` and ``DualBranchConfig`` hold one ``LayoutGuidanceSettings`` each, read from the same
    profile keys as before (η and λ_attn of their own sections, sides and smoothing of ``attention``, chapter 4's
    token softmax and step), reachable under the old attribute names, and both build their refiner through it."""
    d, p, a = cfg["dual_branch"], cfg["didgen"]["pairs"], cfg["attention"]
    dual, pairs = DualBranchConfig.from_profile(cfg), PairConfig.from_profile(cfg)
    assert isinstance(dual.layout, LayoutGuidanceSettings) and isinstance(pairs.layout, LayoutGuidanceSettings)
    assert (dual.eta, dual.lambda_attn, dual.layout.fraction) == (d["eta"], d["lambda_attn"], 1.0)
    assert (pairs.eta, pairs.guidance_fraction, pairs.layout.lambda_ca) == (p["eta"], p["guidance_fraction"], 1.0)
    for c in (dual, pairs):
        assert (c.cross_res, c.self_res, c.smoothing_kernel, c.smoothing_sigma) == (
            a["cross_res"][0], a["self_res"][0], a["smoothing_kernel"], a["smoothing_sigma"])
        assert (c.softmax_scale, c.grad_normalize) == (p["softmax_scale"], p["grad_normalize"])
    # overrides by the old names reach the settings; lambda_attn sets both weights, and a single λ_attn needs them equal
    off = DualBranchConfig.from_profile(cfg, lambda_attn=0.0, eta=0.7, cross_res=4)
    assert (off.layout.lambda_ca, off.layout.lambda_sa, off.eta, off.cross_res) == (0.0, 0.0, 0.7, 4)
    with pytest.raises(ValueError, match="no single λ_attn"):
        DualBranchConfig(layout=LayoutGuidanceSettings(lambda_ca=1.0, lambda_sa=0.5)).lambda_attn
    with pytest.raises(ValueError, match=r"unknown layout-guidance settings \['etaa'\]"):
        LayoutGuidanceSettings().with_overrides(etaa=1.0)
    # the refiners: weights by hand (pairs: w/o CA keeps L_CA at 0, w/o SA drops it), η, step, fraction
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    weights = lambda r: {t.name: t.weight for t in r.terms}  # noqa: E731
    half = LayoutGuidanceSettings(lambda_ca=2.0, lambda_sa=0.5, eta=3.0, fraction=0.25, grad_normalize="max")
    r = half.refiner(half.terms(mask, 4, (7,)))
    assert weights(r) == {"ca": 2.0, "sa": 0.5} and (r.eta, r.fraction, r.normalize) == (3.0, 0.25, "max")
    assert weights(half.refiner(half.terms(mask, 4, (7,), with_ca=False, with_sa=False))) == {"ca": 0.0}
    model = build_mini_components(cfg, build_caption_tokenizer(["an image of a small lesion on skin"],
                                                               model_max_length=16))
    no_ca = PairGenerator(model, PairConfig.from_profile(cfg, use_ca=False)).refiner(mask, 4, (7,))
    assert weights(no_ca) == {"ca": 0.0, "sa": 1.0} and no_ca.fraction == p["guidance_fraction"]
    assert no_ca.eta == p["eta"] and no_ca.normalize == p["grad_normalize"]
    two = DualBranchGenerator(model, off).refiner(mask, 4, (7,))
    assert weights(two) == {"ca": 0.0, "sa": 0.0} and (two.eta, two.fraction) == (0.7, 1.0)


def test_batched_two_branch_step_equals_the_branches_run_separately(model, config, reference):
    """One U-Net call on ``[uncond; cond] x [layout, style]`` under ``DualBranchInjector`` equals, by hand: the
    layout branch alone with ordinary attention, and the style branch alone attending with the layout branch's
    recorded queries to the stored style K/V (``StyleIDInjector`` with γ = 1, T = 1: a separate code path)."""
    unet, g = model.unet, torch.Generator().manual_seed(5)
    t = reference.timesteps[1]
    layout, style = torch.randn(2, 2, 4, 8, 8, generator=g).unbind(0)
    cond, uncond = model.encode_prompt([PROMPT] * 2), model.encode_prompt([""])
    s = config.guidance_scale
    with torch.no_grad():
        with DualBranchInjector(unet, reference.kv, 0, config.selection, (8, 8)):
            both = predict_noise(unet, interleave_branches(layout, style), t, interleave_branches(cond, cond),
                                 uncond, s)
        eps_layout, eps_style = split_branches(both)
        by_hand_layout = predict_noise(unet, layout, t, cond, uncond, s)
        with QueryRecorder(unet, config.selection, latent_size=(8, 8)) as rec:
            predict_noise(unet, layout, t, cond, uncond, s)
        with StyleIDInjector(unet, rec.queries, reference.kv, config.selection, gamma=1.0, temperature=1.0,
                             latent_size=(8, 8)):
            by_hand_style = predict_noise(unet, style, t, cond, uncond, s)
        plain_style = predict_noise(unet, style, t, cond, uncond, s)
    assert torch.allclose(eps_layout, by_hand_layout, atol=1e-5)
    assert torch.allclose(eps_style, by_hand_style, atol=1e-5)
    assert not torch.allclose(eps_style, plain_style, atol=1e-3)  # injection did change the style branch


def test_without_injection_and_guidance_the_style_branch_is_plain_generation_from_z_T_style(model, config, reference):
    off = DualBranchConfig(**{**config.__dict__, "inject_style": False, "lambda_style": 0.0,
                              "layout": config.layout.with_overrides(lambda_attn=0.0)})
    res = DualBranchGenerator(model, off).generate(reference, disks(), PROMPT)
    plain = text_to_image(model, [PROMPT] * 2, num_steps=off.num_steps, guidance_scale=off.guidance_scale,
                          latents=reference.final.expand(2, -1, -1, -1))
    assert torch.allclose(res.images, plain.images, atol=1e-5)
    assert torch.allclose(res.layout_images, plain.images, atol=1e-5)  # no guidance: both branches are plain
    on = DualBranchConfig(**{**off.__dict__, "inject_style": True})
    injected = DualBranchGenerator(model, on).generate(reference, disks(), PROMPT)
    assert not torch.allclose(injected.images, plain.images, atol=1e-3)
    assert torch.allclose(injected.layout_images, plain.images, atol=1e-5)  # the layout branch never injects


def test_inversion_then_reconstruction_is_close_against_the_trivial_baseline(model):
    """DDIM inversion of z_0 over 50 steps, then DDIM sampling from z_T (CFG 1): the round trip lands within a
    tenth of the distance that sampling from fresh noise (the trivial baseline) ends at, and closer than
    with 4 steps (the inversion's approximation error shrinks with the step size)."""
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    cond = model.encode_prompt(["an image of a lesion on skin"])
    err = {}
    with torch.no_grad():
        for n in (4, 50):
            inv = ddim_invert(model.unet, model.scheduler_config, z0, cond, num_steps=n, progress=False)
            rec = sample(model.unet, model.scheduler("ddim"), inv.final, cond, num_steps=n, guidance_scale=1.0,
                         progress=False).latents
            err[n] = float((rec - z0).norm())
        noise = torch.randn(z0.shape, generator=g)
        base = sample(model.unet, model.scheduler("ddim"), noise, cond, num_steps=50, guidance_scale=1.0,
                      progress=False).latents
    assert err[50] < 0.1 * float((base - z0).norm())
    assert err[50] < err[4]


def test_stored_keys_and_values_count_steps_times_selected_layers(model, config, reference):
    # smoke U-Net: up block 0 has two self-attention layers at side 4, up block 1 two at side 8
    assert len(config.selection.layers(model.unet, (8, 8))) == 4
    assert reference.kv_count() == config.num_steps * 4 and reference.kv.timesteps == sorted(reference.timesteps)
    assert all(set(layers) == {l.name for l in config.selection.layers(model.unet, (8, 8))}
               for layers in reference.kv.data.values())
    narrow = DualBranchConfig(**{**config.__dict__, "kv_resolutions": (8,)})
    ref8 = invert_style(model, reference.image, PROMPT, narrow)
    assert ref8.kv_count() == config.num_steps * 2
    assert len(reference.inversion.by_timestep) == config.num_steps  # z_t^style for every t
    cfg_inverted = invert_style(model, reference.image, PROMPT,
                                DualBranchConfig(**{**config.__dict__, "inversion_guidance_scale": 2.0}))
    assert all(k.shape[0] == 1 for layers in cfg_inverted.kv.data.values() for k, _ in layers.values())


def test_model_is_restored_after_an_exception_inside_the_two_branch_phase(model, config, reference):
    unet = model.unet
    before = dict(unet.attn_processors)
    calls = {"n": 0}

    def fail_late(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # 4 calls in the joint phase of 4 steps (2 guidance + 2 denoising), then phase 2
            raise RuntimeError("boom")

    handle = unet.register_forward_pre_hook(fail_late, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            DualBranchGenerator(model, config).generate(reference, disks(), PROMPT)
    finally:
        handle.remove()
    assert calls["n"] == 6
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())
    assert len(unet._forward_pre_hooks) == 0 and len(unet._forward_hooks) == 0


def test_style_term_matches_eq_5_8_by_hand():
    """Channel 0: z = [1, 1, 1, 1] (μ 1, σ 0) vs z_style = [0, 2, 0, 2] (μ 1, σ = sqrt(4/3), unbiased);
    channel 1: z = [0, 0, 2, 2] (μ 1, σ sqrt(4/3)) vs [3, 3, 3, 3] (μ 3, σ 0).
    L = (1−1)² + (0 − sqrt(4/3))² + (1−3)² + (sqrt(4/3) − 0)² = 4/3 + 4 + 4/3."""
    z = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [2.0, 2.0]]]])
    ref = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    term = StyleTerm({501: ref})
    value = term(GuidanceContext(None, z, 501, 0))
    assert value.shape == (1,) and value.item() == pytest.approx(4 / 3 + 4 + 4 / 3, rel=1e-6)
    assert term.weight == 50.0  # λ_style of §5.3.3
    with pytest.raises(ValueError, match="no style latent for timestep 1"):
        term(GuidanceContext(None, z, 1, 0))


def test_styleid_processor_equals_its_formula_by_hand():
    """softmax(T · (γ Q_c + (1 − γ) Q) K_s^T / sqrt(d)) V_s, heads split, for γ = 0.5, T = 2."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x, content, style = torch.randn(3, 1, 9, 16).unbind(0)
    kv = KVStore()
    kv.put(7, "layer", attn.to_k(style), attn.to_v(style))
    owner = type("Owner", (), {})()
    owner.queries = type("Q", (), {"get": staticmethod(lambda t, name: attn.to_q(content))})()
    owner.kv, owner.gamma, owner.temperature, owner.timestep = kv, 0.5, 2.0, 7
    proc = StyleIDProcessor(AttentionLayer("layer", attn, "self", "up", 0, 1), owner)
    with torch.no_grad():
        out = proc(attn, x)
        heads = lambda y: y.view(1, 9, 2, 8).transpose(1, 2)  # noqa: E731
        q = heads(0.5 * attn.to_q(content) + 0.5 * attn.to_q(x))
        p = torch.softmax(2.0 * q @ heads(attn.to_k(style)).transpose(-1, -2) / math.sqrt(8), -1)
        manual = attn.to_out[0]((p @ heads(attn.to_v(style))).transpose(1, 2).reshape(1, 9, 16))
    assert torch.allclose(out, manual, atol=1e-6)


def test_passes_layouts_and_pairs_of_dual_branch_and_two_stage(model, config, reference):
    gen = DualBranchGenerator(model, config)
    dual = gen.generate(reference, disks(), PROMPT)
    two = two_stage_generate(gen, reference, disks(), PROMPT)
    T, b = config.num_steps, config.bifurcation_step
    assert dual.passes == {"denoising": T, "guidance": T, "annotation": 1}  # Eq. 5.9 before B, Eq. 5.10 after
    assert two.passes == {"denoising": 2 * T, "guidance": T, "annotation": 1}
    # rows: [uncond; cond] x 2 targets, x 2 branches after the bifurcation
    assert dual.rows["denoising"] == b * 4 + (T - b) * 8 and two.rows["denoising"] == 2 * T * 4
    assert torch.equal(dual.layout_images, two.layout_images)  # the same layout trajectory in both pipelines
    assert torch.equal(dual.masks, two.masks)
    for res in (dual, two):
        assert res.images.shape == (2, 3, 32, 32) and res.masks.shape == (2, 32, 32) and res.masks.dtype == torch.bool
        assert 0 <= res.images.min() and res.images.max() <= 1
        assert {"ca", "sa"} <= set(res.history[0]) and "style" in res.history[0] and "style" not in res.history[-1]
    assert not torch.allclose(dual.images, two.images, atol=1e-3)


def test_one_reference_per_target_in_one_batch_equals_each_target_alone(model, config, reference):
    """Targets with different style references share a batch (per-target z_T, z_t^style and K/V rows per CFG
    group) without changing each other's result: the batch equals the targets generated one at a time."""
    other = invert_style(model, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(9)), PROMPT, config)
    gen = DualBranchGenerator(model, config)
    both = gen.generate([reference, other], disks(), PROMPT)
    alone = [gen.generate(ref, disks()[i:i + 1], PROMPT) for i, ref in enumerate((reference, other))]
    for name in ("images", "layout_images"):
        assert torch.allclose(getattr(both, name), torch.cat([getattr(a, name) for a in alone]), atol=1e-4)
    pair = two_stage_generate(gen, [reference, other], disks(), PROMPT)
    single = two_stage_generate(gen, other, disks()[1:], PROMPT)
    assert torch.allclose(pair.images[1:], single.images, atol=1e-4)
    with pytest.raises(ValueError, match="3 style references for 2 layout masks"):
        gen.generate([reference, other, other], disks(), PROMPT)


def test_single_branch_ablation_is_the_layout_trajectory_plus_self_query_injection(model, config, reference):
    """Without injection the single branch IS the dual-branch model's layout branch (same guidance, one
    trajectory); with injection it departs from it (clearly when injecting from step 0: on the tiny model the
    last two of four steps barely move the image), at T denoising passes."""
    off = DualBranchConfig(**{**config.__dict__, "inject_style": False})
    layout = DualBranchGenerator(model, config).generate(reference, disks(), PROMPT)
    plain = single_branch_generate(DualBranchGenerator(model, off), reference, disks(), PROMPT)
    assert torch.allclose(plain.images, layout.layout_images, atol=1e-5)
    single = single_branch_generate(DualBranchGenerator(model, config), reference, disks(), PROMPT)
    assert single.passes == {"denoising": config.num_steps, "guidance": config.num_steps, "annotation": 1}
    assert not torch.equal(single.images, layout.layout_images)
    early = single_branch_generate(DualBranchGenerator(model, config), reference, disks(), PROMPT, inject_from=0)
    # clearly: 100x the tolerance the no-injection replay meets (1e-5); the absolute size depends on the random
    # tiny VAE decoder's gain (≈ 7e-3 with the smoke AutoencoderTiny)
    assert (early.images - layout.layout_images).abs().max() > 1e-3
    with pytest.raises(ValueError, match="inject_from"):
        single_branch_generate(DualBranchGenerator(model, config), reference, disks(), PROMPT, inject_from=4)


def test_bad_input_is_named(model, config, reference):
    gen = DualBranchGenerator(model, config)
    with pytest.raises(ValueError, match=r"style image is \(64, 64\) but the model and the layout masks are \(32, 32\)"):
        invert_style(model, torch.rand(3, 64, 64), PROMPT, config)
    with pytest.raises(ValueError, match="produced NaN/inf"):
        invert_style(model, torch.full((3, 32, 32), float("nan")), PROMPT, config)
    with pytest.raises(ValueError, match="resize them"):
        gen.generate(reference, np.ones((1, 16, 16)) * np.eye(16)[None], PROMPT)
    other = DualBranchConfig(**{**config.__dict__, "num_steps": 6})
    with pytest.raises(ValueError, match="inverted over 4 steps"):
        DualBranchGenerator(model, other).generate(reference, disks(), PROMPT)
    with pytest.raises(ValueError, match="do not match images"):
        small = torch.zeros(1, 16, 16, dtype=torch.bool)
        DualBranchResult(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), small, small, torch.zeros(1, 32, 32),
                         torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool), [""], [PROMPT])


def _scene(skin: tuple[int, int, int], lesion: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    img = np.empty((16, 16, 3), np.uint8)
    img[:] = skin
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    img[mask] = lesion
    return img, mask


def _ita(rgb: tuple[int, int, int]) -> float:
    lab = rgb2lab(np.array([[rgb]], np.uint8) / 255.0)[0, 0]
    return math.degrees(math.atan2(lab[0] - 50, lab[2]))


def test_low_contrast_subset_by_ita_difference_and_targets():
    skin = (220, 180, 150)
    lesions = [(200, 160, 130), (90, 50, 30), (210, 170, 140)]  # low, high, lowest contrast
    scenes = [_scene(skin, les) for les in lesions]
    images, masks = np.stack([s[0] for s in scenes]), np.stack([s[1] for s in scenes])
    diffs = [_ita(skin) - _ita(les) for les in lesions]  # uniform regions: the ITA of one colour each
    assert diffs[2] < diffs[0] < 30 < diffs[1]
    low = low_contrast_subset(images, masks, 30.0)
    assert low["index"].tolist() == [2, 0]
    assert np.allclose(low["ita_difference"], [diffs[2], diffs[0]], atol=1e-6)
    assert low_contrast_subset(images, masks, 30.0, max_references=1)["index"].tolist() == [2]
    with pytest.raises(ValueError, match="low-contrast subset is empty"):
        low_contrast_subset(images, masks, -100.0)
    targets = style_targets(images, masks, 30.0, per_sample=2, seed=0)
    assert targets.style_index.tolist() == [2, 2, 0, 0] and targets.layout_masks.shape == (4, 16, 16)
    assert all(0 < m.mean() < 1 for m in targets.layout_masks)
    same = style_targets(images, masks, 30.0, per_sample=1, augment=False)
    assert np.array_equal(same.layout_masks, masks[[2, 0]])


def test_an_empty_low_contrast_subset_falls_back_to_the_lowest_contrast_images_when_asked():
    """A small real set (smoke: 13 ISIC images) may have no image below the threshold: with ``fallback`` the
    lowest-ITA-difference images stand in, flagged; without it the error stays."""
    from ctrlgen.data.attributes import lesion_attributes
    from ctrlgen.methods.dual_branch.targets import low_contrast_subset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((5, 32, 32), bool)
    masks[:, 8:24, 8:24] = True
    ita = lesion_attributes(images, masks)["ita_difference"].to_numpy()
    below = float(ita.min()) - 1.0
    with pytest.raises(ValueError, match="subset is empty"):
        low_contrast_subset(images, masks, below)
    sub = low_contrast_subset(images, masks, below, fallback=2)
    assert sub.attrs["fallback"] and sub["index"].tolist() == np.argsort(ita, kind="stable")[:2].tolist()
    assert not low_contrast_subset(images, masks, float(ita.max()) + 1).attrs.get("fallback")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_annotation_reads_the_layout_branch_at_the_end_of_denoising(spacing):
    """Eq. (5.11) at t = 0: the annotation call (the last U-Net call: the layout rows, conditional only) is, under SD's
    leading timesteps, the last step's call (its conditional layout rows' latent, t = 1: as before); under the smoke
    model's trailing timesteps (last step t = 249), the final layout latent — the one the layout images decode from —
    at t = 1."""
    over = {"models.mini.scheduler.timestep_spacing": "leading", "models.mini.scheduler.prediction_type": "epsilon",
            "models.mini.scheduler.rescale_betas_zero_snr": False} if spacing == "leading" else {}
    cfg = load_profile("smoke", over)
    m = build_mini_components(cfg, build_caption_tokenizer(["an image of a small lesion on skin"], model_max_length=16))
    setup_placeholders(m)
    config = DualBranchConfig.from_profile(cfg, layout_guidance_after=False)
    reference = invert_style(m, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), PROMPT, config)
    calls: list[tuple[torch.Tensor, int]] = []

    def hook(module, args, kwargs):
        calls.append(((args[0] if args else kwargs["sample"]).detach().clone(),
                      int(args[1] if len(args) > 1 else kwargs["timestep"])))

    handle = m.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        res = DualBranchGenerator(m, config).generate(reference, disks(), PROMPT)
    finally:
        handle.remove()
    (z_ann, t_ann), (z_step, t_step) = calls[-1], calls[-2]
    assert t_ann == 1 and z_ann.shape[0] == 2 and z_step.shape[0] == 8  # [uncond; cond] x 2 targets x 2 branches
    layout_cond = split_branches(z_step[4:])[0]
    if spacing == "leading":
        assert t_step == 1 and torch.equal(z_ann, layout_cond)
    else:
        assert t_step == 249 and not torch.allclose(z_ann, layout_cond)
        assert torch.allclose(decode_images(m, z_ann), res.layout_images, atol=1e-6)
