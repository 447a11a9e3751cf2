"""§4.4.6: BoxDiff box losses on hand-made maps, attribute customisation prompts, Null-text inversion."""
from __future__ import annotations

import torch

from ctrlgen.methods.baselines.boxdiff import box_losses, box_masks, corner_loss
from ctrlgen.methods.baselines.null_text_inversion import null_text_invert, sample_plain, sample_with_nulls
from ctrlgen.methods.didgen.dermprompt import SKIN_COLOURS, DermAttributes
from ctrlgen.methods.didgen.further_control import customisation_prompts
from ctrlgen.models import make_scheduler, published_config

from test_attention import tiny_unet

SCHEDULE = {k: v for k, v in published_config("sd21_base", "scheduler").items() if not k.startswith("_")}


def test_box_losses_on_hand_made_maps():
    box = box_masks([(0.25, 0.25, 0.75, 0.75)], 8)
    assert box.sum() == 16 and box[0, 2:6, 2:6].all()
    perfect = box_losses(box.clone(), box)
    assert all(abs(float(v)) < 1e-7 for v in perfect.values())
    outside = 1 - box
    bad = box_losses(outside, box, topk_frac=0.5)
    assert float(bad["ib"]) == 1.0 and float(bad["ob"]) == 1.0
    # corner loss by hand: half-height map inside the box -> normalised to 1 inside; shifted one column right
    shifted = torch.zeros(1, 8, 8)
    shifted[0, 2:6, 3:7] = 1.0
    # x profile: box 0,0,1,1,1,1,0,0 vs map 0,0,0,1,1,1,1,0; edge columns |i-2|<2 or |i-5|<2 -> 1,2,3,4,5,6
    # errors at 2 and 6 -> 2/6; y profile identical -> 0; mean = 1/6
    assert torch.isclose(corner_loss(shifted, box), torch.tensor([1 / 6]))


def test_customisation_changes_only_the_chosen_attribute():
    base = DermAttributes("small", "round", "brown", "in the centre", "light", False, ())
    rows = customisation_prompts(base, "skin_colour")
    assert [v for v, _ in rows] == list(SKIN_COLOURS)
    assert rows[-1][1] == "An image of <lesion> on <skin>, a small round brown lesion in the centre on dark skin"
    marks = customisation_prompts(base, "marks")
    assert marks[0][1].endswith("with a dark frame") and marks[-1][1].endswith("on light skin")


def test_null_text_inversion_reconstructs_better_than_plain_ddim_inversion():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, 4, 16, 16, generator=g)
    cond, uncond = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    inv = null_text_invert(unet, SCHEDULE, z0, cond, uncond, num_steps=4, guidance_scale=7.5, inner_steps=15, lr=5e-2)
    assert len(inv.null_embeddings) == 4 and inv.timesteps == sorted(inv.timesteps, reverse=True)
    rec = sample_with_nulls(unet, SCHEDULE, inv, None, 7.5)
    plain = sample_plain(unet, SCHEDULE, inv.z_T, cond, uncond, 4, 7.5)
    err_nt, err_plain = float((rec - z0).norm()), float((plain - z0).norm())
    print("null-text vs plain reconstruction error:", err_nt, err_plain)
    assert err_nt < 0.7 * err_plain
