"""The zero-terminal-SNR, v-prediction schedule of the mini/smoke base models (issue 12; Lin et al. 2024) against
closed forms: the rescaled ᾱ_t (Lin et al. Algorithm 1), ᾱ_T = 0 and the trailing timesteps; an exact v-denoiser
(the v-analogue of test_sampling's FixedNoiseDenoiser) through DDIM sampling, DDIM inversion and classifier-free
guidance; the training loop's regression target (v, diffusers' ``get_velocity``); and one smoke-size step of every
method that calls the U-Net or trains it, on a tiny model with this schedule, without NaN/inf."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ctrlgen.config import load_profile
from ctrlgen.inversion import ddim_invert, inverse_scheduler
from ctrlgen.methods.attencraft import AttenCraftConfig, MaskSettings, attencraft_finetune
from ctrlgen.methods.baselines.break_a_scene import BreakASceneConfig, break_a_scene_finetune
from ctrlgen.methods.baselines.custom_diffusion import CustomDiffusionConfig, custom_diffusion_finetune
from ctrlgen.methods.baselines.disendiff import DisenDiffConfig, disendiff_finetune
from ctrlgen.methods.baselines.dreambooth import dreambooth_finetune
from ctrlgen.methods.baselines.null_text_inversion import NullTextConfig, edit_image
from ctrlgen.methods.baselines.sd_finetune import sd_finetune
from ctrlgen.methods.cxr_irgen import build_conditions, finetune_backbone
from ctrlgen.methods.cxr_irgen import generate as cxr_generate
from ctrlgen.methods.didgen import setup_placeholders
from ctrlgen.methods.didgen.pair_generation import PairConfig, PairGenerator
from ctrlgen.methods.didgen.region_aware import RegionAwareConfig, region_aware_finetune
from ctrlgen.methods.dual_branch import (DualBranchConfig, DualBranchGenerator, invert_style, single_branch_generate,
                                         two_stage_generate)
from ctrlgen.models import (build_caption_tokenizer, build_mini_components, diffusion_target, make_scheduler,
                            schedule_kwargs)
from ctrlgen.sampling import predict_model_output, predict_noise, sample, text_to_image
from ctrlgen.training import LossContext, select_trainable, train_config_from, train_diffusion

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["a photo of a circle and a square", "an image of a small lesion on skin", "a red circle"]
LESION_PROMPT = "an image of <lesion> on <skin>"


@pytest.fixture(scope="module")
def schedule() -> dict:
    return dict(load_profile("smoke")["models"]["mini"]["scheduler"])


def lin_alphas_cumprod(cfg: dict) -> torch.Tensor:
    """ᾱ_t in float64 by hand: SD's scaled-linear betas, then Lin et al. (2024) Algorithm 1 — √ᾱ shifted so that
    √ᾱ_T = 0 and scaled so that √ᾱ_0 is unchanged."""
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    s = torch.cumprod(1 - betas, 0).sqrt()
    return ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2


def tiny(image_size: int = 32, max_length: int = 16, captions=CAPTIONS, placeholders: bool = False):
    cfg = load_profile("smoke", {"models.image_size": image_size, "models.mini.text_encoder.max_length": max_length})
    model = build_mini_components(cfg, build_caption_tokenizer(list(captions), model_max_length=max_length))
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.scheduler_config["rescale_betas_zero_snr"] is True
    if placeholders:
        setup_placeholders(model)
    return model


def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def params_finite(model) -> bool:
    return all(finite(p) for m in (model.unet, model.text_encoder) for p in m.parameters())


# ============================================================================================ the schedule
def test_the_smoke_schedule_is_lin_et_al_zero_terminal_snr(schedule):
    assert (schedule["prediction_type"], schedule["timestep_spacing"]) == ("v_prediction", "trailing")
    sched = make_scheduler("ddim", schedule)
    want = lin_alphas_cumprod(schedule)
    assert want[-1] == 0 and math.isclose(float(want[0]), 1 - schedule["beta_start"], rel_tol=1e-12)
    assert torch.allclose(sched.alphas_cumprod.double(), want, atol=2e-6)
    assert float(sched.alphas_cumprod[-1]) == 0.0
    assert float(make_scheduler("ddpm", schedule).alphas_cumprod[-1]) == 0.0
    with pytest.raises(ValueError, match="pndm"):
        make_scheduler("pndm", schedule)


def test_ddim_starts_at_t_999_and_the_inverse_scheduler_visits_its_timesteps_in_reverse(schedule):
    sched = make_scheduler("ddim", schedule)
    sched.set_timesteps(25)
    forward = [int(t) for t in sched.timesteps]
    assert forward == list(range(999, 0, -40))  # trailing: round(arange(1000, 0, -40)) - 1, no steps_offset
    inv = inverse_scheduler(schedule)
    inv.set_timesteps(25)
    assert [int(t) for t in inv.timesteps] == forward[::-1]
    ddpm = make_scheduler("ddpm", schedule)
    ddpm.set_timesteps(4)
    assert [int(t) for t in ddpm.timesteps] == [999, 749, 499, 249]


def test_add_noise_at_T_is_the_noise_and_the_velocity_there_is_minus_x0(schedule):
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(2, 2, 4, 8, 8, generator=g).unbind(0)
    t = torch.tensor([999, 999])
    for sched in (make_scheduler("ddim", schedule), make_scheduler("ddpm", schedule)):
        assert torch.equal(sched.add_noise(x0, n, t), n)
        assert torch.equal(sched.get_velocity(x0, n, t), -x0)


@pytest.mark.parametrize("t", [0, 500, 999])
def test_get_velocity_is_the_closed_form_on_a_hand_case(schedule, t):
    """x0 = 1, ε = 2: v = 2√ᾱ_t − √(1 − ᾱ_t) with ᾱ_t of Lin et al. by hand (at T: −1)."""
    ab = float(lin_alphas_cumprod(schedule)[t])
    got = make_scheduler("ddpm", schedule).get_velocity(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0),
                                                        torch.tensor([t]))
    assert float(got) == pytest.approx(2 * math.sqrt(ab) - math.sqrt(1 - ab), abs=2e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_diffusion_target_follows_the_prediction_type_by_hand(schedule, kind):
    """x0 = 1, ε = 2 at t = 500: ε → 2, v → 2√ᾱ_t − √(1 − ᾱ_t) (Lin et al.'s ᾱ_t by hand), sample → 1."""
    ab = float(lin_alphas_cumprod(schedule)[500])
    # ε with zero terminal SNR is refused (schedule_kwargs), so the ε case drops the rescale: ε is the noise anyway
    drop = ("rescale_betas_zero_snr",) if kind == "epsilon" else ()
    sched = make_scheduler("ddpm", {k: v for k, v in schedule.items() if k not in drop} | {"prediction_type": kind})
    got = float(diffusion_target(sched, torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([500])))
    want = {"epsilon": 2.0, "v_prediction": 2 * math.sqrt(ab) - math.sqrt(1 - ab), "sample": 1.0}[kind]
    assert got == pytest.approx(want, abs=2e-6)


def test_diffusion_target_refuses_an_unknown_prediction_type(schedule):
    sched = make_scheduler("ddpm", schedule)
    sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        diffusion_target(sched, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([0]))


def test_zero_snr_with_epsilon_names_the_profile_key(schedule):
    with pytest.raises(ValueError, match="models.mini.scheduler"):
        schedule_kwargs({**schedule, "prediction_type": "epsilon"})


# ============================================================================== an exact denoiser for v
class FixedX0VDenoiser(torch.nn.Module):
    """The exact v-denoiser of a point mass at x0*: v(z, t) = (√ᾱ_t z − x0*)/√(1 − ᾱ_t) (so that
    √ᾱ_t z − √(1 − ᾱ_t) v = x0* for every z and t). With ``x0_uncond`` the rows whose condition's first entry is 0
    get that x0 instead (two denoisers in one, for classifier-free guidance)."""

    def __init__(self, alphas_cumprod: torch.Tensor, x0: torch.Tensor, x0_uncond: torch.Tensor | None = None):
        super().__init__()
        self.ab, self.x0, self.x0_uncond = alphas_cumprod.double(), x0, x0_uncond
        self.calls: list[int] = []

    def forward(self, z, t, encoder_hidden_states=None):
        t = int(t.flatten()[0]) if isinstance(t, torch.Tensor) else int(t)
        self.calls.append(t)
        ab = self.ab[t]
        x0 = self.x0.expand_as(z)
        if self.x0_uncond is not None:
            is_cond = (encoder_hidden_states[:, 0, 0] != 0).view(-1, 1, 1, 1)
            x0 = torch.where(is_cond, x0, self.x0_uncond.expand_as(z))
        v = (ab.sqrt() * z - x0) / (1 - ab).sqrt()
        return type("Out", (), {"sample": v})()


def _x0_and_noise(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)


def test_every_ddim_step_of_the_exact_v_denoiser_predicts_x0_and_sampling_lands_on_it(schedule):
    x0, z_T = _x0_and_noise(0)
    sched = make_scheduler("ddim", schedule)
    model = FixedX0VDenoiser(sched.alphas_cumprod, x0)
    cond = torch.ones(1, 3, 4, dtype=torch.float64)
    # step by step: x̂_0 is x0* at every t, ε̂ at t = T is z_T itself (ᾱ_T = 0: no division by √ᾱ)
    sched.set_timesteps(25)
    z = z_T
    for t in sched.timesteps:
        out = sched.step(predict_model_output(model, z, t, cond), t, z)
        assert torch.allclose(out.pred_original_sample, x0, atol=1e-5)
        z = out.prev_sample
    # the loop: set_alpha_to_one=False (SD's DDIM) ends at ᾱ_0 < 1, so z_0 = √ᾱ_0 x0* + √(1 − ᾱ_0) z_T exactly
    res = sample(model, make_scheduler("ddim", schedule), z_T, cond, num_steps=25, guidance_scale=1.0, progress=False)
    assert res.timesteps[0] == 999 and model.calls[-25:] == res.timesteps
    a0 = float(sched.alphas_cumprod[0])
    assert torch.allclose(res.latents, math.sqrt(a0) * x0 + math.sqrt(1 - a0) * z_T, atol=1e-5)
    assert torch.allclose(res.latents, z, atol=1e-10)
    assert (res.latents - x0).abs().max() < 0.03 * z_T.abs().max() + 1e-3  # √(1 − ᾱ_0) = 0.029
    # with the final ᾱ set to 1 the same loop returns x0* itself, from any z_T
    one = DDIMScheduler(**schedule_kwargs(schedule), clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    for seed in (1, 2):
        start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
        got = sample(model, one, start, cond, num_steps=10, guidance_scale=1.0, progress=False).latents
        assert torch.allclose(got, x0, atol=1e-5)


def test_ddim_inversion_of_x0_then_sampling_returns_x0_for_the_exact_v_denoiser(schedule):
    x0, _ = _x0_and_noise(3)
    sched = make_scheduler("ddim", schedule)
    model = FixedX0VDenoiser(sched.alphas_cumprod, x0)
    cond = torch.ones(1, 3, 4, dtype=torch.float64)
    inv = ddim_invert(model, schedule, x0, cond, num_steps=25, progress=False)
    assert inv.timesteps == list(range(39, 1000, 40)) and finite(*inv.latents)
    # the last inverse step by hand: the model is called at t = T (v = −x0*) on z at t = 959, and ᾱ_T = 0 leaves
    # z_T = ε̂ = √ᾱ_959 v + √(1 − ᾱ_959) z_959
    a959 = float(sched.alphas_cumprod[959])
    assert torch.allclose(inv.final, -math.sqrt(a959) * x0 + math.sqrt(1 - a959) * inv.at(959), atol=1e-5)
    out = sample(model, make_scheduler("ddim", schedule), inv.final, cond, num_steps=25, guidance_scale=1.0,
                 progress=False)
    assert out.timesteps == inv.timesteps[::-1]
    a0 = float(sched.alphas_cumprod[0])
    assert torch.allclose(out.latents, math.sqrt(a0) * x0 + math.sqrt(1 - a0) * inv.final, atol=1e-5)
    # so the round trip misses x0* by at most (1 − √ᾱ_0)‖x0*‖ + √(1 − ᾱ_0)‖z_T‖ (0.03 here)
    assert (out.latents - x0).norm() <= (1 - math.sqrt(a0)) * x0.norm() + math.sqrt(1 - a0) * inv.final.norm() + 1e-6
    assert (out.latents - x0).norm() < 0.002 * x0.norm() + 0.03 * inv.final.norm()
    assert not torch.allclose(inv.final, x0, atol=0.1)


def test_classifier_free_guidance_of_two_exact_v_denoisers_is_the_exact_denoiser_of_the_guided_x0(schedule):
    """v is affine in x0, so v_u + s (v_c − v_u) is the exact v of x0_u + s (x0_c − x0_u)."""
    x0_c, x0_u = _x0_and_noise(4)
    z_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sched = make_scheduler("ddim", schedule)
    model = FixedX0VDenoiser(sched.alphas_cumprod, x0_c, x0_u)
    cond, uncond = torch.ones(2, 3, 4, dtype=torch.float64), torch.zeros(1, 3, 4, dtype=torch.float64)
    a0 = float(sched.alphas_cumprod[0])
    for s in (1.0, 3.0, 7.5):
        res = sample(model, make_scheduler("ddim", schedule), z_T, cond, uncond, num_steps=8, guidance_scale=s,
                     progress=False)
        guided = x0_u + s * (x0_c - x0_u)
        assert torch.allclose(res.latents, math.sqrt(a0) * guided + math.sqrt(1 - a0) * z_T, atol=1e-5), s
    z, t = z_T, torch.tensor(519)
    v_c = model(z, t, cond).sample
    v_u = model(z, t, uncond.expand(2, -1, -1)).sample
    assert torch.allclose(predict_noise(model, z, t, cond, uncond, 7.5), v_u + 7.5 * (v_c - v_u), atol=1e-12)
    assert predict_noise is predict_model_output


# ========================================================================= the training loop's target
@dataclass
class TargetSpy:
    """A zero-weight loss term that keeps what the loop regresses on."""

    name: str = "spy"
    weight: float = 0.0
    needs_cross: bool = False
    needs_self: bool = False
    seen: list = field(default_factory=list)

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        self.seen.append((ctx.target.detach().clone(), ctx.timesteps.detach().clone(), ctx.batch["latents"].clone()))
        return ctx.noise_pred.sum() * 0


def test_the_training_target_under_v_prediction_is_get_velocity():
    model = tiny()
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = model.tokenize(CAPTIONS[:2])
    noisy = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: noisy.append(args[0].detach().clone()))
    spy = TargetSpy()
    try:
        train_diffusion(model, [{"latents": z0, "input_ids": ids}], train_config_from(dict(steps=3, lr=1e-4,
                        progress=False, seed=7)), select_trainable(model.unet, model.text_encoder, mode="full"), [spy])
    finally:
        hook.remove()
    ab_all = lin_alphas_cumprod(model.scheduler_config)
    sched = model.noise_scheduler()
    assert len(spy.seen) == 3 and len(noisy) == 3
    for (target, t, x0), z_t in zip(spy.seen, noisy):
        ab = ab_all[t].view(-1, 1, 1, 1)
        eps = (z_t.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()   # the noise the loop drew, recovered
        v = ab.sqrt() * eps - (1 - ab).sqrt() * x0.double()                 # v by hand (Salimans & Ho 2022)
        assert torch.allclose(target.double(), v, atol=2e-3), t
        assert torch.allclose(target, sched.get_velocity(x0, eps.float(), t), atol=2e-3)
        assert not torch.allclose(target.double(), eps, atol=0.1)  # an ε target would fail here


# ==================================================================== one smoke step of every method path
def _lesion_images(n: int = 2, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, side, side, 3), dtype=np.uint8)
    masks = np.zeros((n, side, side), bool)
    masks[:, 8:24, 10:22] = True
    return images, masks


def _disks(side: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return ((yy - 16) ** 2 + (xx - 16) ** 2 < 64)[None]


def test_sampling_and_inversion_run_finite_on_the_zero_snr_model():
    model = tiny()
    out = text_to_image(model, CAPTIONS[:2], num_steps=4, guidance_scale=3.0, seed=0)
    assert out.timesteps[0] == 999 and finite(out.images, out.latents)
    inv = ddim_invert(model.unet, model.scheduler_config, out.latents, model.encode_prompt(CAPTIONS[:2]),
                      num_steps=4, progress=False)
    assert inv.timesteps[-1] == 999 and finite(*inv.latents)


def test_attencraft_stage_one_and_two_run_finite():
    model = tiny()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = AttenCraftConfig(steps=1, lr=1e-3, cross_res=(8,), omega=0.5,
                           masks=MaskSettings(cross_res=8, self_res=8, score_timesteps=(0, 300)))
    res = attencraft_finetune(model, latent, ["circle", "square"], cfg)
    assert 0 <= res.stage.timestep <= cfg.masks.t_max and finite(res.stage.cross, res.stage.self_attn)
    assert all(math.isfinite(h["loss"]) for h in res.train.history) and params_finite(model)


@pytest.mark.parametrize("method", ["custom_diffusion", "disendiff", "break_a_scene"])
def test_chapter_3_baselines_run_finite(method):
    model = tiny()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    if method == "custom_diffusion":
        res = custom_diffusion_finetune(model, latent, ["circle", "square"],
                                        CustomDiffusionConfig(steps=1, lr=1e-3, cross_res=(8,)))
    elif method == "disendiff":
        res = disendiff_finetune(model, latent, ["circle", "square"], DisenDiffConfig(steps=1, lr=1e-3, cross_res=(8,)))
    else:
        masks = np.zeros((2, 32, 32), bool)
        masks[0, :, :14], masks[1, :, 18:] = True, True
        res = break_a_scene_finetune(model, latent, ["circle", "square"], masks,
                                     BreakASceneConfig(ti_steps=1, steps=1, lr=1e-3, cross_res=(8,)))
    history = [h for r in ([res.train] if hasattr(res, "train") else []) for h in r.history]
    assert all(math.isfinite(h["loss"]) for h in history) and params_finite(model)


def test_didgen_region_aware_finetuning_and_pair_generation_run_finite():
    cfg = load_profile("smoke")
    model = tiny(placeholders=False)
    tokens = setup_placeholders(model)
    images, masks = _lesion_images()
    rc = RegionAwareConfig.from_profile(cfg, steps=1, batch_size=2, lr=1e-3)
    res, _ = region_aware_finetune(model, images, masks, [LESION_PROMPT] * 2, rc, tokens=tokens, progress=False)
    assert all(math.isfinite(v) for h in res.history for v in h.values()) and params_finite(model)
    pairs = PairGenerator(model, PairConfig.from_profile(cfg, num_steps=4)).generate(masks[:1], [LESION_PROMPT], seed=0)
    assert finite(pairs.images, pairs.cross_maps) and all(math.isfinite(h["loss"]) for h in pairs.history)


def test_dual_branch_two_stage_and_single_branch_run_finite():
    cfg = load_profile("smoke")
    model = tiny(placeholders=True)
    config = DualBranchConfig.from_profile(cfg)
    reference = invert_style(model, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), LESION_PROMPT,
                             config)
    assert max(reference.timesteps) == 999 and finite(reference.final)
    gen = DualBranchGenerator(model, config)
    for res in (gen.generate(reference, _disks(), LESION_PROMPT), two_stage_generate(gen, reference, _disks(),
                LESION_PROMPT), single_branch_generate(gen, reference, _disks(), LESION_PROMPT)):
        assert finite(res.images, res.layout_images) and all(math.isfinite(h["loss"]) for h in res.history)


def test_null_text_inversion_with_prompt_to_prompt_runs_finite():
    model = tiny(max_length=16)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images, inv = edit_image(model, image, "a red circle", ["a photo of a circle"], num_steps=3,
                             config=NullTextConfig(inner_steps=2))
    assert finite(images, inv.z_T) and all(math.isfinite(v) for v in inv.losses)


def test_cxr_irgen_vision_finetuning_and_generation_run_finite():
    model = tiny(max_length=16, placeholders=True)
    prompts = [LESION_PROMPT] * 2
    conds = build_conditions(model, prompts, torch.randn(2, model.text_encoder.config.hidden_size), "concat")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    res = finetune_backbone(model, latents, conds, steps=1, batch_size=2, lr=1e-3, dropout=0.0, seed=0,
                            train_config={"progress": False})
    images, z0 = cxr_generate(model, prompts, conds, num_steps=3, guidance_scale=2.0)
    assert all(math.isfinite(h["loss"]) for h in res.history) and finite(images, z0) and params_finite(model)


def test_sd_finetune_and_dreambooth_run_finite():
    model = tiny()
    images, _ = _lesion_images()
    res = sd_finetune(model, images, steps=1, batch_size=2, lr=1e-3, progress=False)
    res2 = dreambooth_finetune(model, images, images, steps=1, batch_size=2, lr=1e-3, progress=False)
    assert all(math.isfinite(h["loss"]) for r in (res, res2) for h in r.history) and params_finite(model)
