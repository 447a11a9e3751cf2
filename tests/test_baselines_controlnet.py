"""ControlNet baseline (§4.4.4; Zhang et al., 2023) on a tiny random mini model.

Zero convolutions make the untrained ControlNet the identity on the base U-Net (exactly, Eq. 2.33 with
Z = 0), in a U-Net call and through the whole sampler; a few training steps change the output while the
base U-Net's weights stay frozen; each training batch's conditioning masks are those of its images.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ctrlgen.methods.baselines.controlnet as cn
import ctrlgen.training.loop as training_loop
from ctrlgen.config import load_profile
from ctrlgen.models import build_caption_tokenizer, build_mini_components
from ctrlgen.sampling import text_to_image

SIDE = 32
PROMPT = "a lesion on skin"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int = 0):
    cfg = load_profile("smoke", {"models.image_size": SIDE, "models.mini.text_encoder.max_length": 24})
    tok = build_caption_tokenizer([PROMPT, "a dark lesion"], model_max_length=24)
    return build_mini_components(cfg, tok, seed=seed)


def pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark squares on skin colour (uint8 ``(n, 32, 32, 3)``) and their masks, all different."""
    rng = np.random.default_rng(seed)
    images = np.full((n, SIDE, SIDE, 3), (220, 180, 160), np.uint8)
    masks = np.zeros((n, SIDE, SIDE), bool)
    for i in range(n):
        y, x, r = rng.integers(4, 20), rng.integers(4, 20), rng.integers(4, 10)
        masks[i, y:y + r, x:x + r + i % 3] = True
        images[i][masks[i]] = (90, 50, 30)
    return images, masks


def unet_inputs(model, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = model.unet.config.sample_size
    return (torch.randn(n, model.unet.config.in_channels, side, side, generator=g), torch.tensor([500] * n),
            model.encode_prompt([PROMPT] * n).detach())


def test_untrained_controlnet_leaves_the_base_unet_output_exactly_unchanged():
    model = tiny()
    net = cn.build_controlnet(model)
    _, masks = pairs(2)
    x, t, emb = unet_inputs(model)
    with torch.no_grad():
        base = model.unet(x, t, encoder_hidden_states=emb).sample
        controlled = cn.ControlledUNet(model.unet, net).condition(cn.conditioning_images(masks, SIDE))
        out = controlled(x, t, encoder_hidden_states=emb).sample
        down, mid = net(x, t, encoder_hidden_states=emb, controlnet_cond=cn.conditioning_images(masks, SIDE),
                        return_dict=False)
    assert all(not r.any() for r in (*down, mid))  # zero convolutions: every residual is exactly 0
    assert torch.equal(out, base)


def test_untrained_controlnet_samples_the_base_models_images():
    model = tiny(1)
    _, masks = pairs(3)
    base = text_to_image(model, [PROMPT] * 3, num_steps=3, guidance_scale=3.0, seed=5).images
    out = cn.controlnet_generate(model, cn.build_controlnet(model), masks, PROMPT, num_steps=3, guidance_scale=3.0,
                                 seed=5)
    assert out.shape == (3, 3, SIDE, SIDE) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, base)


def test_conditioning_is_repeated_for_the_guidance_batch():
    torch.manual_seed(0)
    model = tiny()
    net = cn.build_controlnet(model)
    with torch.no_grad():  # give the zero convolutions weights, so that the conditioning matters
        for p in net.controlnet_down_blocks.parameters():
            p.normal_(0, 0.1)
    _, masks = pairs(2)
    cond = cn.conditioning_images(masks, SIDE)
    x, t, emb = unet_inputs(model)
    x2, t2, emb2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([emb, emb])
    with torch.no_grad():
        once = cn.ControlledUNet(model.unet, net).condition(cond)(x2, t2, encoder_hidden_states=emb2).sample
        twice = cn.ControlledUNet(model.unet, net).condition(torch.cat([cond, cond]))(x2, t2, encoder_hidden_states=emb2).sample
        swapped = cn.ControlledUNet(model.unet, net).condition(cond.flip(0))(x, t, encoder_hidden_states=emb).sample
    assert torch.equal(once, twice)
    assert not torch.allclose(swapped, once[:2])
    with pytest.raises(ValueError, match="2 conditioning images for a batch of 3"):
        cn.ControlledUNet(model.unet, net).condition(cond)(x2[:3], t2[:3], encoder_hidden_states=emb2[:3])


def test_training_changes_the_output_and_only_the_controlnet():
    model = tiny(2)
    images, masks = pairs(6)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    config = cn.ControlNetConfig(train_steps=3, batch_size=2, lr=1e-3)
    net = cn.train_controlnet(model, images, masks, PROMPT, config, seed=0, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
    assert not any(p.requires_grad for p in net.parameters())
    x, t, emb = unet_inputs(model)
    with torch.no_grad():
        base = model.unet(x, t, encoder_hidden_states=emb).sample
        out = cn.ControlledUNet(model.unet, net).condition(cn.conditioning_images(masks[:2], SIDE))(
            x, t, encoder_hidden_states=emb).sample
    assert (out - base).abs().max() > 1e-4


def test_each_training_batch_is_conditioned_on_its_own_masks(monkeypatch):
    """The coupling ``train_controlnet`` relies on: ``train_diffusion`` calls the U-Net on the batch it drew last."""
    model = tiny()
    images, masks = pairs(6)
    seen, drawn = [], []
    forward = cn.ControlledUNet.forward

    def spy_forward(self, sample, *args, **kwargs):
        seen.append(self.cond.clone())
        return forward(self, sample, *args, **kwargs)

    real_train = training_loop.train_diffusion

    def spy_train(m, data, *args, **kwargs):
        def tee():
            for batch in data:
                drawn.append(batch["pixel_values"].clone())
                yield batch
        return real_train(m, tee(), *args, **kwargs)

    monkeypatch.setattr(cn.ControlledUNet, "forward", spy_forward)
    monkeypatch.setattr(cn, "train_diffusion", spy_train)
    cn.train_controlnet(model, images, masks, PROMPT, cn.ControlNetConfig(train_steps=4, batch_size=2), progress=False)
    assert len(seen) == 4 and len(drawn) >= 4
    for cond, pix in zip(seen, drawn):
        lesion = pix[:, 0] < 0  # red channel of the dark square: below mid-grey in [-1, 1]
        assert torch.equal(cond[:, 0].bool(), lesion)


def test_prompts_per_image_and_bad_inputs():
    model = tiny()
    images, masks = pairs(4)
    config = cn.ControlNetConfig(train_steps=1, batch_size=2)
    cn.train_controlnet(model, images, masks, [PROMPT, "a dark lesion"] * 2, config, progress=False)
    with pytest.raises(ValueError, match="one mask and one prompt per image"):
        cn.train_controlnet(model, images, masks, [PROMPT] * 3, config, progress=False)
    with pytest.raises(ValueError, match=r"masks are \(16, 16\) px; the base model draws 32×32"):
        cn.controlnet_generate(model, cn.build_controlnet(model), masks[:, ::2, ::2], PROMPT, num_steps=1)
    with pytest.raises(ValueError, match="binary"):
        cn.conditioning_images(np.full((1, SIDE, SIDE), 0.3), SIDE)
    with pytest.raises(ValueError, match="training images are"):
        cn.train_controlnet(model, images[:, ::2, ::2], masks, PROMPT, config, progress=False)


def test_conditioning_images_are_the_mask_in_three_channels():
    m = np.array([[[0, 1], [1, 1]]], bool)
    c = cn.conditioning_images(m, 2)
    assert c.shape == (1, 3, 2, 2) and all(torch.equal(c[0, i], torch.tensor([[0.0, 1.0], [1.0, 1.0]])) for i in range(3))


def test_conditioning_encoder_downsamples_by_the_vae_factor():
    model = tiny()
    assert model.vae_scale_factor == 4
    net = cn.build_controlnet(model)
    assert tuple(net.config.conditioning_embedding_out_channels) == (16, 32, 96)
    assert net.controlnet_cond_embedding(torch.zeros(1, 3, SIDE, SIDE)).shape[-1] == model.unet.config.sample_size


@pytest.mark.parametrize("name", ["smoke", "mini", "full"])
def test_config_from_every_profile(name):
    cfg = load_profile(name)
    c = cn.ControlNetConfig.from_profile(cfg)
    assert c.train_steps == cfg.gan_baselines.controlnet.train_steps and isinstance(c.adam_betas, tuple)
    if name == "full":  # §4.7.2 diffusion settings
        assert (c.train_steps, c.batch_size, c.lr, c.weight_decay) == (20000, 4, 1e-5, 1e-2)
    with pytest.raises(ValueError, match="unknown setting"):
        cn.ControlNetConfig.from_profile(cfg, steps=3)


# ---------------------------------------------------------------- the U-Net facade and the training target
def test_controlled_unet_is_the_base_unet_called_with_the_controlnet_residuals():
    """The facade by hand: the ControlNet's residuals (Eq. 2.33, scaled, on the masks repeated for the guidance
    batch) passed to the base U-Net; the base U-Net's config, dtype and device; no call before ``condition``."""
    from ctrlgen.methods.baselines.unet_wrapper import ConditionedUNet

    torch.manual_seed(0)
    model = tiny()
    net = cn.build_controlnet(model)
    with torch.no_grad():  # non-zero zero convolutions, so that the residuals are not 0
        for p in (*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()):
            p.normal_(0, 0.1)
    _, masks = pairs(2)
    cond = cn.conditioning_images(masks, SIDE)
    x, t, emb = unet_inputs(model)
    x2, t2, emb2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([emb, emb])
    controlled = cn.ControlledUNet(model.unet, net, conditioning_scale=0.7)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"ControlledUNet: call condition\(images\) before the U-Net"):
            controlled(x, t, encoder_hidden_states=emb)
        down, mid = net(x2, t2, encoder_hidden_states=emb2, controlnet_cond=torch.cat([cond, cond]),
                        conditioning_scale=0.7, return_dict=False)
        want = model.unet(x2, t2, encoder_hidden_states=emb2, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        got = controlled.condition(cond)(x2, t2, encoder_hidden_states=emb2).sample
        base = model.unet(x2, t2, encoder_hidden_states=emb2).sample
    assert torch.equal(got, want) and not torch.allclose(got, base)
    assert isinstance(controlled, ConditionedUNet) and controlled.cond is cond
    assert controlled.config is model.unet.config and controlled.dtype == model.unet.dtype
    assert controlled.device == model.unet.device == torch.device("cpu")


def record_training_targets(monkeypatch) -> list[dict]:
    """Spy on ``train_diffusion``: per step, what it noised (z_0, ε, t, the schedule) and the target its loss
    compared the U-Net's output with."""
    from diffusers import DDPMScheduler

    seen: list[dict] = []
    add_noise, rec = DDPMScheduler.add_noise, training_loop.reconstruction_loss

    def spy_add_noise(self, latents, noise, t):
        seen.append({"z0": latents.detach().clone(), "eps": noise.detach().clone(), "t": t.clone(),
                     "abar": self.alphas_cumprod.clone(), "prediction_type": self.config.prediction_type})
        return add_noise(self, latents, noise, t)

    def spy_rec(pred, target, *args, **kwargs):
        seen[-1]["target"] = target.detach().clone()
        return rec(pred, target, *args, **kwargs)

    monkeypatch.setattr(DDPMScheduler, "add_noise", spy_add_noise)
    monkeypatch.setattr(training_loop, "reconstruction_loss", spy_rec)
    return seen


def assert_velocity_targets(seen: list[dict], steps: int) -> None:
    """Each step's target is v = √ᾱ_t ε − √(1 − ᾱ_t) z_0 (Salimans & Ho 2022, closed form), not ε, on a
    zero-terminal-SNR schedule (ᾱ_T = 0)."""
    assert len(seen) == steps
    for s in seen:
        assert s["prediction_type"] == "v_prediction" and float(s["abar"][-1]) < 1e-6
        a = s["abar"][s["t"]].view(-1, 1, 1, 1)
        torch.testing.assert_close(s["target"], a.sqrt() * s["eps"] - (1 - a).sqrt() * s["z0"], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(s["target"], s["eps"], atol=1e-3)


def test_controlnet_trains_against_the_v_prediction_target_of_the_base_models_schedule(monkeypatch):
    """The mini base models predict v (zero-terminal-SNR schedule): ControlNet's loss compares with v, built by the
    book's trainer from the scheduler, never with ε."""
    model = tiny()
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    seen = record_training_targets(monkeypatch)
    images, masks = pairs(4)
    cn.train_controlnet(model, images, masks, PROMPT, cn.ControlNetConfig(train_steps=2, batch_size=2), progress=False)
    assert_velocity_targets(seen, 2)


def test_shuffled_batches_are_full_batches_of_one_seeded_permutation_per_epoch():
    """5 samples in batches of 2: two full batches per epoch (the fifth sample waits for a later epoch), each epoch
    the next permutation of numpy's generator seeded 7; fewer samples than a batch: one short batch per epoch."""
    from itertools import islice

    from ctrlgen.methods.baselines.unet_wrapper import shuffled_batches

    got = [b.tolist() for b in islice(shuffled_batches(5, 2, seed=7), 4)]
    rng = np.random.default_rng(7)
    first, second = rng.permutation(5).tolist(), rng.permutation(5).tolist()
    assert got == [first[0:2], first[2:4], second[0:2], second[2:4]]
    assert [b.tolist() for b in islice(shuffled_batches(1, 4), 2)] == [[0], [0]]


def test_a_conditioned_unet_must_say_how_it_conditions():
    """``ConditionedUNet`` is abstract in ``unet_kwargs``: a subclass without it fails at construction."""
    from torch import nn

    from ctrlgen.methods.baselines.unet_wrapper import ConditionedUNet

    class Silent(ConditionedUNet):
        pass

    with pytest.raises(TypeError, match="unet_kwargs"):
        Silent(nn.Identity())
