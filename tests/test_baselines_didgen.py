"""DiDGen baselines of Table 4.1 on a tiny random model: SD-finetune (§4.4.2) and DreamBooth (Ruiz et al., 2023).

References are computed here independently of ``ctrlgen.training``: the noise schedule from its
published formula, L_rec by hand on fixed noise, DreamBooth's L = L_inst + λ L_prior from the
U-Net's own predictions on one batch.
"""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

import ctrlgen.methods.baselines.dreambooth as db
import ctrlgen.methods.baselines.sd_finetune as sdf
from ctrlgen.config import load_profile
from ctrlgen.models import build_caption_tokenizer, build_mini_components

SIDE = 32
CLASS = "An image of skin."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int = 0):
    cfg = load_profile("smoke", {"models.image_size": SIDE, "models.mini.text_encoder.max_length": 24})
    tok = build_caption_tokenizer([sdf.PROMPT, CLASS], model_max_length=24)
    return build_mini_components(cfg, tok, seed=seed)


def lesions(n: int, seed: int = 0) -> np.ndarray:
    """Dark discs on skin-coloured backgrounds, uint8 ``(n, 32, 32, 3)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    out = np.empty((n, SIDE, SIDE, 3))
    for i in range(n):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
        out[i] = [220, 180, 160]
        out[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = [90, 50, 30]
    return np.clip(out + rng.normal(0, 5, out.shape), 0, 255).astype(np.uint8)


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1


def alphas_cumprod(cfg: dict) -> torch.Tensor:
    """ᾱ_t of SD's "scaled_linear" schedule: β = linspace(√β_start, √β_end, T)², ᾱ = Π(1 − β); with
    ``rescale_betas_zero_snr`` Lin et al. (2024) Algorithm 1: √ᾱ shifted to end at 0 and scaled to keep √ᾱ_0."""
    assert cfg["beta_schedule"] == "scaled_linear"
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    if cfg.get("rescale_betas_zero_snr"):
        s = ab.sqrt()
        ab = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
    return ab.float()


@torch.no_grad()
def fixed_noise_loss(model, images: np.ndarray, prompt: str, seed: int = 123) -> float:
    """L_rec (Eq. 4.3) of ``images`` on fixed noise and fixed timesteps spread over [50, 950], against the model's
    own target: ε under ε-prediction, v = √ᾱ_t ε − √(1−ᾱ_t) z_0 under v-prediction (the smoke models' schedule)."""
    z = model.encode_images(pixels(images))
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.linspace(50, 950, len(z)).long()
    ab = alphas_cumprod(model.scheduler_config)[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * z + (1 - ab).sqrt() * noise
    target = noise if model.scheduler_config.get("prediction_type", "epsilon") == "epsilon" else \
        ab.sqrt() * noise - (1 - ab).sqrt() * z
    pred = model.unet(noisy, t, encoder_hidden_states=model.encode_prompt([prompt] * len(z))).sample
    return float(((pred - target) ** 2).mean())


def drop_bar(model) -> float:
    """How far a short finetune must lower ``fixed_noise_loss``: measured 0.75 (SD-finetune, 30 and 60 steps alike) and
    0.80 (DreamBooth, 20 steps) under the smoke models' v-prediction; ε-prediction fell below 0.7."""
    return 0.7 if model.scheduler_config.get("prediction_type", "epsilon") == "epsilon" else 0.88


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def spy_batches(monkeypatch, module) -> list[dict]:
    """Record every batch the training loop draws (the loop itself runs unchanged)."""
    seen: list[dict] = []
    real = module.train_diffusion

    def spy(model, data, *args, **kwargs):
        def tee():
            for batch in data:
                seen.append(batch)
                yield batch
        return real(model, tee(), *args, **kwargs)

    monkeypatch.setattr(module, "train_diffusion", spy)
    return seen


def row_index(row: torch.Tensor, pool: torch.Tensor) -> int:
    """Index of the pool image equal to ``row`` (or its mirror); −1 if none."""
    for i, p in enumerate(pool):
        if torch.equal(row, p) or torch.equal(row, p.flip(-1)):
            return i
    return -1


def test_sd_finetune_trains_the_unet_only_on_one_fixed_prompt_and_lowers_l_rec(monkeypatch):
    model = tiny()
    images = lesions(4)
    seen = spy_batches(monkeypatch, sdf)
    te, vae, unet = snapshot(model.text_encoder), snapshot(model.vae), snapshot(model.unet)
    before = fixed_noise_loss(model, images, sdf.PROMPT)
    res = sdf.sd_finetune(model, images, steps=30, batch_size=2, lr=1e-3, progress=False)
    after = fixed_noise_loss(model, images, sdf.PROMPT)
    print(f"SD-finetune L_rec on fixed noise: {before:.3f} -> {after:.3f}")
    assert res.steps == 30 and len(res.history) == 30 and len(seen) == 30
    assert after < drop_bar(model) * before
    # every batch: the one prompt (decoded back to text) and images of the training set (or their mirror)
    pool = pixels(images)
    for batch in seen:
        texts = model.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        assert [" ".join(t.split()) for t in texts] == ["an image of lesion on skin ."] * 2
        assert all(row_index(r, pool) >= 0 for r in batch["pixel_values"])
    # U-Net trained (every tensor moved), text encoder and VAE untouched, U-Net frozen again afterwards
    assert all(not torch.equal(unet[n], p) for n, p in model.unet.named_parameters())
    assert all(torch.equal(te[n], p) for n, p in model.text_encoder.named_parameters())
    assert all(torch.equal(vae[n], p) for n, p in model.vae.named_parameters())
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_class_images_are_uint8_at_model_size_deterministic_and_leave_the_model_frozen():
    model = tiny(1)
    params = snapshot(model.unet)
    a = db.generate_class_images(model, CLASS, 3, num_steps=3, guidance_scale=3.0, seed=5, batch_size=2)
    assert a.shape == (3, SIDE, SIDE, 3) and a.dtype == np.uint8 and a.std() > 0
    assert np.array_equal(a, db.generate_class_images(model, CLASS, 3, 3, 3.0, seed=5, batch_size=2))
    assert not np.array_equal(a, db.generate_class_images(model, CLASS, 3, 3, 3.0, seed=6, batch_size=2))
    # the seed fixes one noise stream: batching does not change the images (up to uint8 rounding)
    whole = db.generate_class_images(model, CLASS, 3, 3, 3.0, seed=5, batch_size=3)
    assert np.abs(whole.astype(int) - a).max() <= 1
    assert all(torch.equal(params[n], p) for n, p in model.unet.named_parameters())
    with pytest.raises(ValueError, match="at least one"):
        db.generate_class_images(model, CLASS, 0, 3, 3.0)


def test_prior_batches_hold_b_instance_then_b_class_images_with_weights_2_and_2_lambda():
    model = tiny()
    inst, cls = lesions(3), lesions(5, seed=9)
    it = db.prior_batches(model, inst, cls, sdf.PROMPT, CLASS, batch_size=2, prior_weight=0.25, seed=0)
    pi, pc = pixels(inst), pixels(cls)
    for _ in range(4):
        b = next(it)
        assert b["pixel_values"].shape == (4, 3, SIDE, SIDE)
        assert all(row_index(r, pi) >= 0 for r in b["pixel_values"][:2])
        assert all(row_index(r, pc) >= 0 for r in b["pixel_values"][2:])
        texts = [" ".join(t.split()) for t in model.tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)]
        assert texts == ["an image of lesion on skin ."] * 2 + ["an image of skin ."] * 2
        assert b["rec_weight"].tolist() == [2.0, 2.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="same size"):
        next(db.prior_batches(model, inst, lesions(2)[:, :16, :16], sdf.PROMPT, CLASS, 2, 1.0))


def test_dreambooth_loss_is_l_inst_plus_lambda_l_prior_by_hand(monkeypatch):
    """One step: the logged loss equals mean‖y − ŷ‖² on the instance half + λ times that on the class half,
    with ε and t redrawn from the loop's seeded generator, ŷ read off the U-Net and y the model's target:
    ε, or v = √ᾱ_t ε − √(1−ᾱ_t) z_0 under v-prediction (z_0: the latents the loop encoded)."""
    model = tiny()
    inst, cls, lam, seed = lesions(3), lesions(4, seed=9), 0.3, 7
    seen = spy_batches(monkeypatch, db)
    encoded: list[torch.Tensor] = []
    real_encode = model.encode_images

    def encode(*args, **kwargs):
        encoded.append(real_encode(*args, **kwargs).detach().clone())
        return encoded[-1]

    monkeypatch.setattr(model, "encode_images", encode)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        (torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).detach().clone(), out.sample.detach().clone())),
        with_kwargs=True)
    te = snapshot(model.text_encoder)
    try:
        res = db.dreambooth_finetune(model, inst, cls, steps=1, batch_size=2, lr=1e-3, prior_weight=lam, seed=seed,
                                     progress=False)
    finally:
        hook.remove()
    assert len(seen) == 1 and len(calls) == 1
    t_seen, pred = calls[0]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(pred.shape, generator=gen)
    t = torch.randint(0, 1000, (4,), generator=gen)
    assert torch.equal(t, t_seen.cpu())  # the same draws as the loop
    target = noise
    if model.scheduler_config.get("prediction_type", "epsilon") == "v_prediction":
        ab = alphas_cumprod(model.scheduler_config)[t].view(-1, 1, 1, 1)
        target = ab.sqrt() * noise - (1 - ab).sqrt() * encoded[-1]
    l_inst = ((pred[:2] - target[:2]) ** 2).mean()
    l_prior = ((pred[2:] - target[2:]) ** 2).mean()
    got = res.history[0]["loss"]
    print(f"DreamBooth step: logged {got:.6f}, L_inst {float(l_inst):.6f} + {lam} * L_prior {float(l_prior):.6f}")
    assert got == pytest.approx(float(l_inst + lam * l_prior), rel=1e-5)
    assert got != pytest.approx(float((l_inst + l_prior) / 2), rel=1e-3)  # not a plain mean over the batch
    assert all(torch.equal(te[n], p) for n, p in model.text_encoder.named_parameters())


def test_dreambooth_lowers_instance_l_rec_and_needs_class_images():
    model = tiny(2)
    images = lesions(4, seed=2)
    cls = db.generate_class_images(model, CLASS, 4, num_steps=3, guidance_scale=3.0, seed=0)
    unet = snapshot(model.unet)
    before = fixed_noise_loss(model, images, sdf.PROMPT)
    res = db.dreambooth_finetune(model, images, cls, steps=20, batch_size=2, lr=1e-3, progress=False)
    after = fixed_noise_loss(model, images, sdf.PROMPT)
    print(f"DreamBooth L_rec (instances) on fixed noise: {before:.3f} -> {after:.3f}")
    assert res.steps == 20 and after < drop_bar(model) * before
    assert all(not torch.equal(unet[n], p) for n, p in model.unet.named_parameters())
    with pytest.raises(ValueError, match="needs class images"):
        db.dreambooth_finetune(model, images, cls[:0], steps=1, batch_size=2, progress=False)


def test_precomputed_latents_are_the_posterior_means_for_both_baselines():
    """With ``precompute_latents`` SD-finetune and DreamBooth see the same latents as region-aware finetuning."""
    from ctrlgen.methods.baselines.dreambooth import prior_batches
    from ctrlgen.data.tensors import image_tensor
    from ctrlgen.methods.baselines.sd_finetune import fixed_prompt_batches

    model = tiny()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, SIDE, SIDE, 3), dtype=np.uint8)
    with torch.no_grad():
        means = model.encode_images(image_tensor(images))
    batch = next(iter(fixed_prompt_batches(model, images, "an image of lesion on skin", 4, precompute_latents=True)))
    assert "pixel_values" not in batch
    assert any(torch.allclose(batch["latents"][0], m, atol=1e-5) for m in means)
    pb = next(iter(prior_batches(model, images, images[:2], "a", "b", 2, 0.5, precompute_latents=True)))
    assert pb["latents"].shape == (4, *means.shape[1:]) and "pixel_values" not in pb


def test_sd_finetune_flips_the_side_words_with_the_image_and_dreambooth_does_not_flip():
    """A prompt naming a side is mirrored exactly for the flipped samples (``batch["flipped"]``)."""
    from ctrlgen.methods.didgen.dermprompt import dermprompt_vocabulary

    cfg = load_profile("smoke", {"models.image_size": SIDE, "models.mini.text_encoder.max_length": 24})
    model = build_mini_components(cfg, build_caption_tokenizer(dermprompt_vocabulary(), model_max_length=24))
    images = lesions(4)
    pool = pixels(images)
    text = lambda ids: " ".join(model.tokenizer.decode(ids, skip_special_tokens=True).split())  # noqa: E731
    flips = []
    for batch in islice(sdf.fixed_prompt_batches(model, images, "a lesion on the left", 2, seed=0), 8):
        for row, ids, flipped in zip(batch["pixel_values"], batch["input_ids"], batch["flipped"]):
            i = next(k for k in range(4) if torch.equal(row, pool[k]) or torch.equal(row, pool[k].flip(-1)))
            assert torch.equal(row, pool[i].flip(-1) if flipped else pool[i])
            assert text(ids) == ("a lesion on the right" if flipped else "a lesion on the left")
            flips.append(bool(flipped))
    assert any(flips) and not all(flips)
    b = next(db.prior_batches(model, images, images, "a lesion on the left", "skin", 2, 1.0))
    assert all(torch.equal(r, pool[i]) for r in b["pixel_values"] for i in [row_index(r, pool)])  # never mirrored


@pytest.mark.parametrize("method", ["sd", "dreambooth"])
def test_train_config_repeating_an_argument_wins_instead_of_a_duplicate_keyword_error(monkeypatch, method):
    module = sdf if method == "sd" else db
    seen = {}
    monkeypatch.setattr(module, "train_diffusion", lambda model, data, tc, *a, **k: seen.setdefault("tc", tc))
    model, images = tiny(), lesions(2)
    extra = {"steps": 1, "lr": 0.5, "seed": 4, "weight_decay": 0.0}
    if method == "sd":
        sdf.sd_finetune(model, images, steps=5, batch_size=2, lr=1e-3, adam_betas=(0.8, 0.9), train_config=extra,
                        progress=False)
    else:
        db.dreambooth_finetune(model, images, images, steps=5, batch_size=2, lr=1e-3, adam_betas=(0.8, 0.9),
                               train_config=extra, progress=False)
    tc = seen["tc"]
    assert (tc.steps, tc.lr, tc.seed, tc.weight_decay, tc.betas, tc.eps) == (1, 0.5, 4, 0.0, (0.8, 0.9), 1e-8)
