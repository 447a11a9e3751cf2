"""The one text-to-image entry point: same numbers as the loop it replaces, one image convention, its options."""
from __future__ import annotations

import pytest
import torch

from ctrlgen.guidance import GuidanceRefiner
from ctrlgen.sampling import initial_latents, sample, text_to_image

from test_didgen_further import tiny_sd

PROMPTS = ["An image of <lesion> on <skin>", "An image of <lesion> on <skin>, a small lesion",
           "An image of <lesion> on <skin>, a brown lesion"]


@pytest.fixture(scope="module")
def model():
    return tiny_sd()


@torch.no_grad()
def old_path(model, prompts, steps, scale, seed, batch):
    """The encode -> noise -> sample -> decode loop that pretrain/DreamBooth wrote by hand before the pipeline."""
    g = torch.Generator().manual_seed(seed)
    uncond, out = model.encode_prompt([""]), []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        z = initial_latents(len(chunk), model.unet.config.in_channels, model.unet.config.sample_size, g)
        res = sample(model.unet, model.scheduler("ddim"), z, model.encode_prompt(chunk), uncond, num_steps=steps,
                     guidance_scale=scale, generator=g, progress=False)
        out.append(model.decode_latents(res.latents).clamp(-1, 1))
    return torch.cat(out)


def test_fixed_seed_equals_the_old_sample_and_decode_path(model):
    for seed, batch in ((0, 2), (5, 3)):
        ref = old_path(model, PROMPTS, 3, 3.0, seed, batch)
        got = text_to_image(model, PROMPTS, num_steps=3, guidance_scale=3.0, seed=seed, batch_size=batch)
        assert torch.equal(got.images, (ref + 1) / 2)
    other = text_to_image(model, PROMPTS, num_steps=3, guidance_scale=3.0, seed=1, batch_size=2)
    assert not torch.equal(other.images, got.images)


def test_image_convention_is_float32_nchw_unit_range_on_cpu(model):
    out = text_to_image(model, PROMPTS[:2], num_steps=2, guidance_scale=3.0, seed=0)
    side = model.unet.config.sample_size * model.vae_scale_factor
    assert out.images.dtype == torch.float32 and out.images.device.type == "cpu"
    assert out.images.shape == (2, 3, side, side)
    assert out.images.min() >= 0 and out.images.max() <= 1
    with torch.no_grad():
        decoded = model.decode_latents(out.latents)
    torch.testing.assert_close(out.images, ((decoded.clamp(-1, 1) + 1) / 2).cpu(), rtol=0, atol=0)
    assert out.latents.shape == (2, model.unet.config.in_channels, model.unet.config.sample_size,
                                 model.unet.config.sample_size)
    only = text_to_image(model, PROMPTS[:2], num_steps=2, guidance_scale=3.0, seed=0, output_type="latent")
    assert only.images is None and torch.equal(only.latents, out.latents)


def test_same_noise_callback_given_latents_and_errors(model):
    same = text_to_image(model, [PROMPTS[0], PROMPTS[0], PROMPTS[1]], num_steps=2, guidance_scale=3.0, seed=3,
                         same_noise=True, batch_size=2)
    assert torch.equal(same.noise[0], same.noise[2]) and torch.equal(same.images[0], same.images[1])
    assert not torch.equal(same.images[0], same.images[2])  # only the prompt differs
    seen = []
    again = text_to_image(model, PROMPTS, num_steps=2, guidance_scale=3.0, latents=same.noise,
                          callback=lambda i, t, z: seen.append((i, t, z.shape[0])), batch_size=2)
    torch.testing.assert_close(again.images[0], same.images[0], rtol=0, atol=1e-5)  # same prompt, same z_T
    assert [(i, b) for i, _, b in seen] == [(0, 2), (1, 2), (0, 1), (1, 1)] and again.timesteps == [t for _, t, _ in seen[:2]]
    with pytest.raises(ValueError, match="call text_to_image once per batch"):
        text_to_image(model, PROMPTS, num_steps=2, refiner=GuidanceRefiner([]), batch_size=2)
    with pytest.raises(ValueError, match="2 initial latents for 3 prompts"):
        text_to_image(model, PROMPTS, num_steps=2, latents=same.noise[:2])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        text_to_image(model, [], num_steps=2)
