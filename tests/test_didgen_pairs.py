"""Lesion–mask pair generation (§4.3.4): bad conditioning masks, Eq. (4.11) annotation against
scikit-image's Otsu, fallbacks counted, and a batched run on a tiny random model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from ctrlgen.config import load_profile
from ctrlgen.methods.didgen.pair_generation import (
    ANNOTATION_TIMESTEP,
    PairConfig,
    PairGenerator,
    annotate_masks,
    annotation_input,
    augment_masks,
    condition_masks_from,
    validate_condition_masks,
)
from ctrlgen.methods.didgen.region_aware import setup_placeholders
from ctrlgen.models import build_caption_tokenizer, build_mini_components
from ctrlgen.sampling import decode_images


def disk_mask(side=32, r=8, cy=16, cx=16):
    yy, xx = np.mgrid[:side, :side]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def test_bad_conditioning_masks_raise_clear_errors():
    good = disk_mask()
    assert validate_condition_masks(good, 32).shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"all zero: \[1\]"):
        validate_condition_masks(np.stack([good, np.zeros_like(good)]), 32)
    with pytest.raises(ValueError, match=r"all one: \[0\]"):
        validate_condition_masks(np.ones((1, 32, 32)), 32)
    with pytest.raises(ValueError, match="resize them"):
        validate_condition_masks(disk_mask(64, 16, 32, 32), 32)


def test_annotation_tau0_is_scikit_image_otsu_and_identity_self_attention_changes_nothing():
    g = torch.Generator().manual_seed(0)
    cross = torch.rand(2, 8, 8, generator=g)
    cross[:, 2:6, 2:6] += 1.0
    out = annotate_masks(cross, None, 8, tau=0, dilate=0, erode=0)
    for i in range(2):
        ref = cross[i].numpy() > threshold_otsu(cross[i].numpy(), nbins=256)
        assert np.array_equal(out["mask"][i].numpy(), ref)
    eye = torch.eye(64).expand(2, 64, 64)
    out4 = annotate_masks(cross, eye, 8, tau=4, dilate=0, erode=0)
    assert torch.equal(out4["mask"], out["mask"]) and not out4["fallback"].any() and out4["ok"].all()


def test_uniform_self_attention_and_constant_maps_fall_back_or_drop_counted():
    cross = torch.zeros(3, 8, 8)
    cross[:2, 2:6, 2:6] = 1.0  # samples 0, 1 have a lesion map; sample 2 is constant
    uniform = torch.full((3, 64, 64), 1 / 64)
    out = annotate_masks(cross, uniform, 16, tau=4, dilate=1, erode=1)
    # A_S uniform: A_CS is constant -> τ annotation fails, τ = 0 is used (counted); sample 2 fails both
    assert out["fallback"].tolist() == [True, True, False] and out["ok"].tolist() == [True, True, False]
    assert out["failure_tau"] == ["constant map"] * 3 and out["failure"] == ["", "", "constant map"]
    assert out["mask"][0].any() and not out["mask"][0].all() and out["mask"].shape == (3, 16, 16)


def test_augmentation_and_real_mask_sampling():
    masks = np.stack([disk_mask(64, 10, 30, 30), disk_mask(64, 14, 34, 28), np.zeros((64, 64), bool)])
    out, src, counts = condition_masks_from(masks, 5, size=32, seed=0, augment=True)
    assert out.shape == (5, 32, 32) and counts["skipped_unusable"] == 1 and set(src) <= {0, 1}
    assert all(0 < m.mean() < 1 for m in out)
    aug, kept = augment_masks(masks[:2], np.random.default_rng(1), scale=(1.0, 1.0))
    assert kept == 0 and np.allclose(aug.mean((1, 2)), masks[:2].mean((1, 2)), rtol=0.15)


def test_batched_generation_on_a_tiny_model():
    cfg = load_profile("smoke")
    tok = build_caption_tokenizer(["an image of a small lesion on skin"], model_max_length=16)
    model = build_mini_components(cfg, tok)
    setup_placeholders(model)
    pc = PairConfig.from_profile(cfg, num_steps=4)
    assert (pc.eta, pc.tau, pc.cross_res, pc.self_res, pc.guidance_fraction) == (0.3, 4, 8, 8, 0.5)
    assert (pc.grad_normalize, pc.softmax_scale) == ("max", 1.0)  # smoke follows mini's step (see the profile)
    gen = PairGenerator(model, pc)
    masks = np.stack([disk_mask(), disk_mask(32, 6, 10, 20), disk_mask(32, 9, 20, 12)])
    prompts = ["an image of <lesion> on <skin>", "an image of <lesion> on <skin>, a small lesion",
               "an image of <lesion> on <skin>"]
    res = gen.generate(masks, prompts, seed=0, batch_size=2)
    assert res.images.shape == (3, 3, 32, 32) and res.masks.shape == res.masks_tau0.shape == (3, 32, 32)
    assert torch.equal(res.cond_masks, torch.from_numpy(masks))
    assert len(res.history) == 2 * 2 and all({"ca", "sa"} <= set(h) for h in res.history)  # 2 batches x 2 guided steps
    c = res.counts()
    assert c["pairs"] == 3 and c["ok"] + c["dropped"] == 3
    v = res.valid()
    assert len(v.images) == c["ok"] and all(m.any() and not m.all() for m in v.masks)
    again = gen.generate(masks, prompts, seed=0, batch_size=2)
    assert torch.equal(again.images, res.images)  # same seed, same pairs
    with pytest.raises(ValueError, match="'<lesion>' does not occur in the prompt 'an image of skin'"):
        gen.generate(masks[:1], ["an image of skin"])


def test_mask_augmentation_is_a_switch_real_masks_as_they_are_or_augmented():
    """``augment`` false (the thesis): the conditioning masks are the real masks, resized only; true (the book's
    default): flipped / rotated / scaled copies of the same source masks."""
    from skimage.transform import resize

    masks = np.stack([disk_mask(64, 10, 20, 24), disk_mask(64, 14, 40, 30), disk_mask(64, 8, 30, 44)])
    thesis = PairConfig.from_profile(load_profile("smoke", {"didgen.pairs.augment": False}))
    book = PairConfig.from_profile(load_profile("smoke"))
    assert (thesis.augment_masks, book.augment_masks, book.augment_scale) == (False, True, (0.8, 1.2))
    real, src, counts = thesis.condition_masks(masks, 6, size=32, seed=0)
    by_hand = np.stack([resize(m.astype(np.float32), (32, 32), order=0, anti_aliasing=False) > 0.5 for m in masks])
    assert np.array_equal(real, by_hand[src]) and counts == {"skipped_unusable": 0, "kept_unaugmented": 0}
    aug, src_aug, _ = book.condition_masks(masks, 6, size=32, seed=0)
    assert np.array_equal(src_aug, src)  # the same source masks, drawn by the same seed
    assert sum(not np.array_equal(a, r) for a, r in zip(aug, real)) >= 5
    with pytest.raises(ValueError, match="augment_scale"):
        PairConfig(augment_scale=(1.2, 0.8))


def test_l_ca_only_guidance_with_a_normalised_step_changes_the_pairs():
    """The ablation that equalled the unguided run (§4.4.5 'w/o SA guidance'): with ``grad_normalize="max"`` every guided
    step moves z_t by at least η (one entry by exactly η), and the images differ from the unguided ones; the full
    profile keeps the thesis' raw step and ×100 softmax, smoke/mini the normalised step without sharpening."""
    cfg = load_profile("smoke")
    tok = build_caption_tokenizer(["an image of a small lesion on skin"], model_max_length=16)
    model = build_mini_components(cfg, tok)
    setup_placeholders(model)
    thesis = PairConfig.from_profile(cfg)
    assert (thesis.grad_normalize, thesis.softmax_scale) == ("max", 1.0)
    full = PairConfig.from_profile(load_profile("full"))
    assert (full.grad_normalize, full.softmax_scale, full.eta) == ("none", 100.0, 20.0)
    pc = PairConfig.from_profile(cfg, num_steps=4, use_sa=False, eta=0.5, grad_normalize="max")
    gen = PairGenerator(model, pc)
    assert gen.refiner(torch.ones(1, 32, 32), 4, (7,)).normalize == "max"
    masks = np.stack([disk_mask(), disk_mask(32, 6, 10, 20)])
    guided = gen.generate(masks, ["an image of <lesion> on <skin>"], seed=0)
    plain = PairGenerator(model, PairConfig.from_profile(cfg, num_steps=4, guidance=False)).generate(
        masks, ["an image of <lesion> on <skin>"], seed=0)
    assert all(h["step_norm"] >= 0.5 - 1e-6 and h["grad_norm"] > 0 for h in guided.history) and len(guided.history) == 2
    assert float((guided.images - plain.images).abs().mean()) > 1e-3


SD_SCHEDULE = {"models.mini.scheduler.timestep_spacing": "leading", "models.mini.scheduler.prediction_type": "epsilon",
               "models.mini.scheduler.rescale_betas_zero_snr": False}  # SD's ε model: leading timesteps, steps_offset 1


class UNetInputs:
    """Records every U-Net call's (latent, timestep) with a forward pre-hook."""

    def __init__(self, unet):
        self.calls: list[tuple[torch.Tensor, int]] = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.calls.append((x.detach().clone(), int(t)))


def test_annotation_input_is_the_end_of_denoising_for_both_spacings():
    """Eq. (4.11)'s t̂ is the end of denoising: at a last sampled timestep t <= 1 (SD's leading spacing) the last step's
    input at that t; above it (trailing: 249 of 4 steps) the final latent at t = 1."""
    before, final = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    assert annotation_input(before, final, 1) == (before, 1) and annotation_input(before, final, 0) == (before, 0)
    z, t = annotation_input(before, final, 249)
    assert z is final and t == ANNOTATION_TIMESTEP == 1


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_pair_annotation_reads_the_unet_at_the_end_of_denoising(spacing):
    """The annotation call (the last U-Net call of a batch, conditional rows only) under SD's leading timesteps is the
    last step's call (its conditional half's latent, t = 1: as before); under the trailing timesteps of the ZTSNR smoke
    model (last step t = 249) it is the final latent — the one the returned images decode from — at t = 1."""
    cfg = load_profile("smoke", SD_SCHEDULE if spacing == "leading" else {})
    assert cfg["models"]["mini"]["scheduler"]["timestep_spacing"] == spacing
    model = build_mini_components(cfg, build_caption_tokenizer(["an image of a small lesion on skin"],
                                                               model_max_length=16))
    setup_placeholders(model)
    gen = PairGenerator(model, PairConfig.from_profile(cfg, num_steps=4, guidance=False))
    rec = UNetInputs(model.unet)
    try:
        res = gen.generate(np.stack([disk_mask(), disk_mask(32, 6, 10, 20)]), ["an image of <lesion> on <skin>"],
                           seed=0)
    finally:
        rec.handle.remove()
    (z_ann, t_ann), (z_step, t_step) = rec.calls[-1], rec.calls[-2]
    assert len(rec.calls) == 5 and z_ann.shape[0] == 2 and z_step.shape[0] == 4  # 4 CFG steps, then the annotation
    assert t_ann == 1
    if spacing == "leading":
        assert t_step == 1 and torch.equal(z_ann, z_step[2:])  # unchanged: the last step's own input at t = 1
    else:
        assert t_step == 249 and not torch.allclose(z_ann, z_step[2:])
        assert torch.allclose(decode_images(model, z_ann), res.images, atol=1e-6)  # the final latent z_0
