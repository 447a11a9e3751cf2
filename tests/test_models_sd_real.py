"""The full profile's code path on the real SD 2.1-base / SD 1.4 architectures with random weights (slow).

One region-aware training step (Eq. 4.6: L_rec + α L_attn on 16x16 cross-attention, Custom-Diffusion
parameters) from 512x512 images through the real VAE, and one guided sampling step (Eq. 4.10:
L_CA at 16x16 + L_SA at 32x32) at the real 64x64 latent. float32 on CPU, batch 1.
"""
from __future__ import annotations

import gc

import pytest
import torch

from ctrlgen.attention import AttentionCapture, available_resolutions
from ctrlgen.guidance import LayoutGuidance
from ctrlgen.models import add_placeholder_tokens, build_from_published_config, locate_tokens
from ctrlgen.sampling import sample
from ctrlgen.training import AttentionAlignmentTerm, TrainConfig, select_trainable, train_diffusion

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["sd21_base", "sd14"])
def test_real_architecture_train_and_guided_sample(arch):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_from_published_config(arch)
    model.tokenizer.model_max_length = 77
    add_placeholder_tokens(model.tokenizer, model.text_encoder, ["<lesion>", "<skin>"], ["lesion", "skin"])
    assert available_resolutions(model.unet, "cross") == [64, 32, 16, 8]  # 8: the mid block
    prompt = "an image of <lesion> on <skin>"
    ids = model.tokenize([prompt])
    loc = locate_tokens(model.tokenizer, ids, ["<lesion>", "<skin>"])
    pos = loc.positions[0].tolist()
    mask = torch.zeros(1, 1, 512, 512)
    mask[:, :, 128:384, 160:352] = 1
    batch = {"pixel_values": torch.rand(1, 3, 512, 512) * 2 - 1, "input_ids": ids, "mask": mask,
             "token_indices": torch.tensor([pos]), "token_masks": torch.cat([mask, 1 - mask], 1)}

    tp = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion")
    res = train_diffusion(model, [batch], TrainConfig(steps=1, lr=1e-5, cross_res=(16,), progress=False), tp,
                          [AttentionAlignmentTerm(weight=0.1)])
    assert res.steps == 1 and torch.isfinite(torch.tensor(res.history[0]["loss"]))
    assert 0 < res.history[0]["attn"] < 1
    del tp, res
    gc.collect()

    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    with torch.no_grad():
        cond, uncond = model.encode_prompt([prompt]), model.encode_prompt([""])
    guide = LayoutGuidance(mask=mask[0, 0], token_index=pos[0], last=int(loc.ends[0]),
                           cross_res=16, self_res=32, eta=20.0, fraction=1.0)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    with AttentionCapture(model.unet, cross_res=[16], self_res=[32]) as store:
        out = sample(model.unet, model.scheduler("ddim"), z, cond, uncond, num_steps=1, guidance_scale=7.5,
                     refine=guide, store=store, progress=False)
    assert out.latents.shape == (1, 4, 64, 64) and torch.isfinite(out.latents).all()
    assert len(guide.history) == 1 and 0 <= guide.history[0]["ca"] <= 2 and 0 <= guide.history[0]["sa"]
    assert store.cross(16).shape == (1, 16, 16, 77) and store.self_attention(32).shape == (1, 1024, 1024)
