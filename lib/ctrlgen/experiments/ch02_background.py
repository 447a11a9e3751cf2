"""Chapter 2's experiments: DDPM on a 2-D toy distribution, the background of thesis §2.1.3, small enough to watch;
then the book's base models (trained by ``ctrlgen.experiments.base_models``, which every chapter uses) and what
chapter 2 shows of them: tables of their training and quality, the pretraining figures, the ν/τ maps and the
self-attention affinity. The chapter calls these functions and logs what they return.

The forward process uses the thesis's notation: q(x_t | x_{t-1}) = N(√α_t x_{t-1}, (1 − α_t) I)
(Eq. 2.12), whose T-fold product (Eq. 2.11) has the closed form q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
with ᾱ_t = ∏_{s≤t} α_s. The noise predictor is trained with L_DDPM (Eq. 2.23) and sampled either
ancestrally (Eq. 2.24, diffusers' ``DDPMScheduler``) or deterministically (``DDIMScheduler``, η = 0).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from sklearn.datasets import make_moons, make_swiss_roll
from torch import nn

from ctrlgen import figures, result_cache
from ctrlgen.analysis.attention_views import nu_tau_iou, real_maps
from ctrlgen.analysis.self_attention import summarize_affinity
from ctrlgen.attention import otsu_mask, self_enhance
from ctrlgen.data.caption_labels import with_complete_captions
from ctrlgen.data.domains import DomainData
from ctrlgen.data.tensors import image_tensor
from ctrlgen.experiments import base_models
from ctrlgen.experiments.base_models import word_alignment
from ctrlgen.experiments.base_models.bar import model_bar
from ctrlgen.parallel import run_all
from ctrlgen.metrics.distribution import sliced_wasserstein
from ctrlgen.metrics.overlap import iou
from ctrlgen.progress import tqdm
from ctrlgen.sampling import decode_images

TOY_DISTRIBUTIONS = ("eight_gaussians", "two_moons", "swiss_roll")


def sample_toy(name: str, n: int, seed: int) -> np.ndarray:
    """``n`` points from a named 2-D distribution, standardised to zero mean and unit variance."""
    rng = np.random.default_rng(seed)
    if name == "eight_gaussians":
        angles = rng.integers(0, 8, size=n) * (2 * math.pi / 8)
        centres = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 2.0
        points = centres + 0.12 * rng.standard_normal((n, 2))
    elif name == "two_moons":
        points, _ = make_moons(n_samples=n, noise=0.06, random_state=int(rng.integers(2**31)))
    elif name == "swiss_roll":
        roll, _ = make_swiss_roll(n_samples=n, noise=0.4, random_state=int(rng.integers(2**31)))
        points = roll[:, [0, 2]]
    else:
        raise ValueError(f"unknown toy distribution {name!r}; choose one of {', '.join(TOY_DISTRIBUTIONS)}")
    points = (points - points.mean(0)) / points.std(0)
    return points.astype(np.float32)


def make_scheduler(kind: str, num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
    """A diffusers scheduler: ``"ddpm"`` (ancestral, Eq. 2.24) or ``"ddim"`` (deterministic, η = 0)."""
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**common, variance_type="fixed_small")
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True)
    raise ValueError(f"unknown scheduler kind {kind!r}; use 'ddpm' or 'ddim'")


def forward_closed_form(scheduler, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε: one draw from q(x_t | x_0) (diffusers' ``add_noise``)."""
    timesteps = torch.full((x0.shape[0],), t, dtype=torch.long)
    return scheduler.add_noise(x0, noise, timesteps)


def forward_chain(scheduler, x0: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    """Iterate the Markov chain of Eq. (2.11)–(2.12) from x_0 to x_t, one Gaussian step at a time.

    diffusers indexes timesteps from 0, so "step t" here applies α_0 … α_t (t + 1 transitions),
    which is what ``add_noise(x0, ε, t)`` marginalises.
    """
    alphas = scheduler.alphas
    x = x0.clone()
    for s in range(t + 1):
        eps = torch.randn(x.shape, generator=generator)
        x = alphas[s].sqrt() * x + (1 - alphas[s]).sqrt() * eps
    return x


def chain_moments(alphas: torch.Tensor, t: int) -> tuple[float, float]:
    """Exact mean coefficient m and variance v of the iterated chain after steps 0..t.

    The recursion m_s = √α_s m_{s−1}, v_s = α_s v_{s−1} + (1 − α_s) never forms ᾱ_t, so it checks the
    closed form (m = √ᾱ_t, v = 1 − ᾱ_t) independently.
    """
    m, v = 1.0, 0.0
    for s in range(t + 1):
        a = float(alphas[s])
        m, v = math.sqrt(a) * m, a * v + (1.0 - a)
    return m, v


class SinusoidalEmbedding(nn.Module):
    """Transformer-style timestep embedding (as in the DDPM U-Net)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class EpsMLP(nn.Module):
    """ε_θ(x_t, t) for 2-D points: an MLP on [x_t, embed(t)]."""

    def __init__(self, hidden: int = 128, time_dim: int = 32, depth: int = 3):
        super().__init__()
        self.embed = SinusoidalEmbedding(time_dim)
        layers: list[nn.Module] = [nn.Linear(2 + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(torch.cat([x, self.embed(t)], dim=1))


def train_ddpm(model: nn.Module, data: np.ndarray, scheduler, steps: int, batch_size: int, lr: float,
               seed: int, progress: bool = True) -> list[float]:
    """Minimise L_DDPM = E_{t,x_0,ε} ||ε_θ(x_t, t) − ε||² (Eq. 2.23); return the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.from_numpy(data)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(steps, 1))
    num_t = scheduler.config.num_train_timesteps
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="DDPM training", disable=not progress, mininterval=1.0):
        idx = torch.randint(0, len(points), (batch_size,), generator=generator)
        x0 = points[idx]
        t = torch.randint(0, num_t, (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        loss = torch.mean((model(x_t, t) - noise) ** 2)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        lr_schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def sample(model: nn.Module, scheduler, x_T: torch.Tensor, num_inference_steps: int, seed: int,
           keep_every: int = 0, callback: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``scheduler``'s reverse process from ``x_T``; return x_0 and (optionally) a thinned trajectory.

    With ``DDPMScheduler`` each step draws fresh noise (Eq. 2.24) from a generator seeded by ``seed``;
    with ``DDIMScheduler`` (η = 0) the map x_T → x_0 is deterministic.
    """
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # DDPM does, DDIM (η=0) needs none
    x = x_T.clone()
    trajectory = [x.clone()] if keep_every else []
    for i, t in enumerate(scheduler.timesteps):
        eps = model(x, t)
        kwargs = {"generator": generator} if takes_generator else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        if callback is not None:
            callback(i, x)
        if keep_every and ((i + 1) % keep_every == 0 or i + 1 == len(scheduler.timesteps)):
            trajectory.append(x.clone())
    return x, trajectory


# ================================================================================ the toy experiment's tables
@dataclass
class SplitTable:
    """A table of the chapter split by what the record keeps where.

    ``metrics``: values the profile and seed determine (the record's metrics, identical from a warm or an
    empty cache); ``timings``: wall-clock columns (the record's ``timings``); ``shown_only``: columns for the
    reader alone (e.g. whether a model came from the cache). ``shown()`` joins all three for the page."""

    metrics: pd.DataFrame
    timings: pd.DataFrame
    shown_only: pd.DataFrame | None = None

    def shown(self) -> pd.DataFrame:
        frame = self.metrics.join(self.timings)
        return frame if self.shown_only is None else frame.join(self.shown_only)

    def log(self, run: Any, table: str) -> None:
        """``run.log_table`` for the metrics, ``run.log_timing`` for every timing cell (same row labels)."""
        run.log_table(table, self.metrics)
        for row, values in self.timings.to_dict(orient="index").items():
            label = " / ".join(map(str, row)) if isinstance(row, tuple) else str(row)
            for column, value in values.items():
                run.log_timing(table, label, str(column), value)


def moments_table(scheduler, timesteps: Sequence[int] | None = None) -> pd.DataFrame:
    """The iterated chain's exact moments (``chain_moments``) beside the closed form of Eq. (2.11), one row per t."""
    num_t = scheduler.config.num_train_timesteps
    timesteps = timesteps or [t for t in (0, 10, 50, 100, 250, 500, 750) if t < num_t - 1] + [num_t - 1]
    rows = []
    for t in timesteps:
        m, v = chain_moments(scheduler.alphas, t)
        abar = float(scheduler.alphas_cumprod[t])
        rows.append({"t": t, "chain mean coef.": m, "√ᾱ_t": abar ** 0.5, "chain variance": v, "1 − ᾱ_t": 1 - abar})
    return pd.DataFrame(rows).set_index("t")


def max_moment_gap(moments: pd.DataFrame) -> float:
    """Largest |chain − closed form| over the mean coefficients and variances of ``moments_table``."""
    return float(max((moments["chain mean coef."] - moments["√ᾱ_t"]).abs().max(),
                     (moments["chain variance"] - moments["1 − ᾱ_t"]).abs().max()))


def forward_simulation(toy: Mapping[str, Any], scheduler, seed: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The same data points pushed through the chain and through the closed form at three timesteps.

    Returns the sliced W1 between the two clouds and, as the Monte-Carlo floor, between two independent
    closed-form draws (rows ``simulation t=…``), and the clouds for a figure. ``toy`` is the profile's
    ``ch02.toy`` section."""
    x0 = torch.from_numpy(sample_toy(toy["distribution"], toy["chain_samples"], seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    panels, rows = {}, {}
    for t in (50, 200, scheduler.config.num_train_timesteps - 1):
        chain = forward_chain(scheduler, x0, t, gen).numpy()
        closed = forward_closed_form(scheduler, x0, t, torch.randn(x0.shape, generator=gen)).numpy()
        closed2 = forward_closed_form(scheduler, x0, t, torch.randn(x0.shape, generator=gen)).numpy()
        rows[f"simulation t={t}"] = {"SW(chain, closed form)": sliced_wasserstein(chain, closed, seed=seed),
                                     "SW floor": sliced_wasserstein(closed2, closed, seed=seed)}
        panels[f"chain, t={t}"], panels[f"closed form, t={t}"] = chain, closed
    return pd.DataFrame.from_dict(rows, orient="index"), panels


def train_toy(toy: Mapping[str, Any], scheduler, seed: int) -> tuple[np.ndarray, EpsMLP, list[float]]:
    """Draw the toy data and train ``EpsMLP`` on it with L_DDPM (Eq. 2.23); return data, model and losses.

    The network's initial weights come from torch's global generator seeded with ``seed`` inside
    ``fork_rng``: they do not depend on what ran before in the kernel, and nothing after depends on them."""
    data = sample_toy(toy["distribution"], toy["n_data"], seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EpsMLP(hidden=toy["hidden"])
    losses = train_ddpm(model, data, scheduler, steps=toy["train_steps"], batch_size=toy["batch_size"],
                        lr=toy["lr"], seed=seed)
    return data, model, losses


def final_loss(losses: Sequence[float]) -> float:
    """Mean of the last 10 % of the per-step losses (at least one)."""
    return float(np.mean(losses[-max(1, len(losses) // 10):]))


@dataclass
class Samplers:
    """Both samplers run from the same x_T: final samples, thinned trajectories and their labels."""

    x_T: torch.Tensor
    ddpm_x0: torch.Tensor
    ddpm_path: list[torch.Tensor]
    ddim_x0: torch.Tensor
    ddim_path: list[torch.Tensor]
    num_train_timesteps: int
    ddim_steps: int
    determinism: pd.DataFrame

    @property
    def ddpm_label(self) -> str:
        return f"DDPM ancestral ({self.num_train_timesteps} steps)"

    @property
    def ddim_label(self) -> str:
        return f"DDIM η=0 ({self.ddim_steps} steps)"


def compare_samplers(model: nn.Module, toy: Mapping[str, Any], ddpm, seed: int) -> Samplers:
    """DDPM ancestral sampling over all T steps and DDIM (η = 0) over ``ddim_steps``, from the same x_T; each
    run again with another sampler seed, which moves DDPM's samples and leaves DDIM's unchanged."""
    num_t, ddim_steps = toy["num_train_timesteps"], toy["ddim_steps"]
    x_T = torch.randn((toy["n_samples"], 2), generator=torch.Generator().manual_seed(seed + 2))
    ddim = make_scheduler("ddim", num_t, toy["beta_schedule"])
    ddpm_x0, ddpm_path = sample(model, ddpm, x_T, num_t, seed=seed + 3, keep_every=num_t // 4)
    ddim_x0, ddim_path = sample(model, ddim, x_T, ddim_steps, seed=seed + 3, keep_every=max(1, ddim_steps // 4))
    ddim_again, _ = sample(model, ddim, x_T, ddim_steps, seed=seed + 99)
    ddpm_again, _ = sample(model, ddpm, x_T, num_t, seed=seed + 99)
    run = Samplers(x_T, ddpm_x0, ddpm_path, ddim_x0, ddim_path, num_t, ddim_steps, pd.DataFrame())
    run.determinism = pd.DataFrame({"max |x₀ − x₀'| for the same x_T, another seed": [
        float((ddpm_x0 - ddpm_again).abs().max()), float((ddim_x0 - ddim_again).abs().max())]},
        index=pd.Index([run.ddpm_label, run.ddim_label], name="sampler"))
    return run


def sampler_figures(data: np.ndarray, samplers: Samplers) -> dict[str, Any]:
    """The samples of both samplers beside data and noise, and each sampler's trajectory (name -> figure)."""
    n = len(samplers.x_T)
    return {
        "ddpm_vs_ddim_samples": figures.scatter_panels(
            {"data": data[:n], f"DDPM, {samplers.num_train_timesteps} steps": samplers.ddpm_x0.numpy(),
             f"DDIM, {samplers.ddim_steps} steps": samplers.ddim_x0.numpy(), "x_T (noise)": samplers.x_T.numpy()},
            suptitle="Samples from the same model and the same x_T"),
        "ddpm_trajectory": figures.scatter_panels({f"DDPM {i}/4": p.numpy() for i, p in enumerate(samplers.ddpm_path)},
                                                  suptitle="Ancestral trajectory"),
        "ddim_trajectory": figures.scatter_panels({f"DDIM {i}/4": p.numpy() for i, p in enumerate(samplers.ddim_path)},
                                                  suptitle="DDIM trajectory"),
    }


def distance_table(toy: Mapping[str, Any], samplers: Samplers, seed: int) -> pd.DataFrame:
    """Sliced W1 of each sampler's samples to fresh data, bracketed by a second data draw (floor) and x_T (ceiling)."""
    fresh = sample_toy(toy["distribution"], toy["n_samples"], seed=seed + 7)
    reference = sample_toy(toy["distribution"], toy["n_samples"], seed=seed + 8)
    table = pd.DataFrame({"sliced W1 to data": {
        "data vs data (floor)": sliced_wasserstein(reference, fresh, seed=seed),
        samplers.ddpm_label: sliced_wasserstein(samplers.ddpm_x0.numpy(), fresh, seed=seed),
        samplers.ddim_label: sliced_wasserstein(samplers.ddim_x0.numpy(), fresh, seed=seed),
        "x_T noise (ceiling)": sliced_wasserstein(samplers.x_T.numpy(), fresh, seed=seed),
    }})
    table.index.name = "samples"
    return table


# ================================================================================ the base models (second half)
@dataclass
class BaseModels:
    """Every domain's data and its pretrained variants (``base_models.PretrainResult`` per variant)."""

    datas: dict[str, DomainData]
    results: dict[str, dict[str, Any]]
    aligned: dict[str, dict[str, Any]] = field(default_factory=dict)  # scenes variant -> its stage-B record

    def describe(self) -> str:
        """One line per domain (images, source), with the data's notes beneath when it has any."""
        lines = []
        for data in self.datas.values():
            lines.append(data.describe())
            if data.notes:
                lines.append(f"    {data.notes}")
        return "\n".join(lines)


def pretrain_base_models(cfg: Mapping[str, Any]) -> BaseModels:
    """Train (or load from the cache) every variant of every domain's mini base model. The data kept for the
    chapter's measurements carry complete captions (``data.caption_labels``): prompts and labels that name
    every attribute, while the models trained on the captions as written."""
    datas, results, aligned = {}, {}, {}
    for domain in base_models.DOMAINS:
        data = base_models.load_domain_data(cfg, domain)
        results[domain] = {v: base_models.pretrain_domain(cfg, domain, v == "selfattn", progress=False, data=data)
                           for v in base_models.available_variants(cfg, domain)}
        datas[domain] = with_complete_captions(cfg, data)
        if domain == word_alignment.DOMAIN:
            aligned = run_all({v: partial(word_alignment.align_words, cfg, v, False, data) for v in results[domain]},
                              cfg, "word alignment")
    return BaseModels(datas, results, aligned)


ALIGNED = " + words"  # label of a scenes variant after its stage B (``base_models.word_alignment``)


def word_alignment_table(base: BaseModels) -> SplitTable:
    """Per scenes variant: stage B's steps and its last-50-step mean L_rec and L_attn (the alignment loss, Eq. 4.5)
    against the first 50 steps'; the training wall time as a timing."""
    index = pd.Index([f"{v}{ALIGNED}" for v in base.aligned], name="variant")

    def mean(history: list[dict], key: str, last: bool) -> float:
        part = history[-50:] if last else history[:50]
        return float(np.mean([h[key] for h in part]))

    metrics = pd.DataFrame([{"stage B steps": r["steps"], "L_rec first 50": mean(r["history"], "rec", False),
                             "L_rec last 50": mean(r["history"], "rec", True),
                             "L_attn first 50": mean(r["history"], "attn", False),
                             "L_attn last 50": mean(r["history"], "attn", True)} for r in base.aligned.values()], index=index)
    timings = pd.DataFrame({"training wall time [s]": [round(r["seconds"], 1) for r in base.aligned.values()]}, index=index)
    return SplitTable(metrics, timings)


def pretraining_table(base: BaseModels) -> SplitTable:
    """Per (domain, variant): data, training images, U-Net steps; the training wall time as a timing; whether
    the model came from the cache for the reader only (a warm and an empty cache give the same metrics)."""
    index = pd.MultiIndex.from_tuples([(d, v) for d, rs in base.results.items() for v in rs], names=["domain", "variant"])
    rows = [(base.datas[d], r) for d, rs in base.results.items() for r in rs.values()]
    metrics = pd.DataFrame([{"default base": r.is_default, "data": f"{r.dataset} ({r.source})",
                             "train images": len(data.images), "U-Net steps": r.steps} for data, r in rows], index=index)
    timings = pd.DataFrame({"training wall time [s]": [round(r.train_seconds, 1) for _, r in rows]}, index=index)
    shown = pd.DataFrame({"from cache": [r.cached for _, r in rows], "folder": [str(r.folder) for _, r in rows]},
                         index=index)
    return SplitTable(metrics, timings, shown)


QUALITY_COLUMNS = ("vae_psnr_heldout_db", "SW1 samples", "SW1 floor (train vs held-out data)",
                   "SW1 ceiling (per-pixel Gaussian)", "heldout loss t=250", "heldout loss t=500",
                   "heldout loss t=750")


def quality_table(base: BaseModels) -> SplitTable:
    """The quality figures stored with each model (``base_models.measure_model``); seconds per sample is a timing."""
    frame = pd.DataFrame({(d, v): r.metrics for d, rs in base.results.items() for v, r in rs.items()}).T
    frame.index.names = ["domain", "variant"]
    return SplitTable(frame[list(QUALITY_COLUMNS)].astype(float), frame[["seconds per sample"]].astype(float))


def quality_lines(quality: pd.DataFrame) -> list[str]:
    """Per model: where the samples' SW1 falls between the data floor and the per-pixel-Gaussian ceiling."""
    lines = []
    for (d, v), row in quality.iterrows():
        where = ("below the floor" if row["SW1 samples"] <= row["SW1 floor (train vs held-out data)"] else
                 "between floor and ceiling" if row["SW1 samples"] <= row["SW1 ceiling (per-pixel Gaussian)"] else
                 "above the per-pixel-Gaussian ceiling")
        lines.append(f"{d}/{v}: samples' SW1 {row['SW1 samples']:.3f} — {where}; "
                     f"VAE round trip {row['vae_psnr_heldout_db']:.1f} dB")
    return lines


def quality_bar_table(cfg: Mapping[str, Any], base: BaseModels) -> pd.DataFrame:
    """The base-model quality bar (``base_models.bar``, issue 12) for every domain and variant, one row per
    criterion and quantity: value, threshold, pass / fail / undefined and the signed margin."""
    frames = []
    for domain, results in base.results.items():
        for variant, result in results.items():
            model = base_models.load_variant(cfg, domain, variant)
            table = model_bar(cfg, model, result.key, base.datas[domain], variant)
            frames.append(table.assign(domain=domain, variant=variant))
            if domain == word_alignment.DOMAIN and variant in base.aligned:
                aligned = word_alignment.load_aligned(cfg, variant)
                table = model_bar(cfg, aligned, base.aligned[variant]["key"], base.datas[domain], variant)
                frames.append(table.assign(domain=domain, variant=f"{variant}{ALIGNED}"))
    frame = pd.concat(frames, ignore_index=True)
    return frame.set_index(["domain", "variant", "criterion", "quantity"])[["value", "threshold", "status", "margin"]]


def quality_curve(cfg: Mapping[str, Any], base: BaseModels) -> pd.DataFrame:
    """The quality bar against minutes of training of each domain's default base model: its EMA snapshots
    (``pretrain.unet.curve_points``) and the final model, the chosen point. One row per (domain, step,
    criterion, quantity) with the training minutes (VAE included) at that step."""
    frames = []
    for domain, results in base.results.items():
        variant = base_models.default_variant(cfg, domain)
        result = results[variant]
        points = [(s["step"], s["train_seconds"]) for s in result.snapshots] + [(result.steps, result.curve_seconds)]
        for step, seconds in points:
            final = step == result.steps
            model = (base_models.load_variant(cfg, domain, variant) if final
                     else base_models.load_snapshot(cfg, domain, step))
            table = model_bar(cfg, model, result.key if final else f"{result.key}@{step}", base.datas[domain], variant)
            frames.append(table.assign(domain=domain, step=step, minutes=seconds / 60, chosen=final))
    return pd.concat(frames, ignore_index=True)


def colour_dispersion(held: np.ndarray, images: np.ndarray) -> dict[str, float]:
    """How much of the data's colour variety ``images`` (N, H, W, 3 in [0, 1]) keep, per RGB channel: the
    spread (std over images) of each image's mean colour and the mean within-image std, each as a ratio to
    the held-out images' (1 = the data's variety; below 1 = samples regress to the average)."""
    out = {}
    spread = images.mean(axis=(1, 2)).std(0) / held.mean(axis=(1, 2)).std(0)
    within = images.std(axis=(1, 2)).mean(0) / held.std(axis=(1, 2)).mean(0)
    for c, name in enumerate("RGB"):
        out[f"colour spread {name}"] = float(spread[c])
        out[f"within-image std {name}"] = float(within[c])
    return out


def colour_mean_slopes(held: np.ndarray, trips: np.ndarray) -> dict[str, float]:
    """Least-squares slope of the VAE round trip's per-image mean colour against the original's, per channel
    (1 = kept; below 1 = the decoder pulls every image towards the average colour)."""
    m, r = held.mean(axis=(1, 2)), trips.mean(axis=(1, 2))
    return {f"VAE colour-mean slope {name}": float(np.polyfit(m[:, c], r[:, c], 1)[0]) for c, name in enumerate("RGB")}


def dispersion_table(cfg: Mapping[str, Any], base: BaseModels) -> pd.DataFrame:
    """Colour variety of each default model's samples and of its VAE round trips against the held-out images
    (the diagnosis behind the zero-terminal-SNR schedule and the SW1 criterion); cached by model key."""
    rows = {}
    for domain, results in base.results.items():
        variant = base_models.default_variant(cfg, domain)
        result, data = results[variant], base.datas[domain]
        n = min(int(cfg["pretrain"]["quality_bar"]["n_samples"]), len(data.heldout_captions))
        guidance = float(cfg["sampling"]["guidance_scale"])
        steps = int(cfg["pretrain"]["quality_bar"]["sample_steps"])
        held = image_tensor(data.heldout_images[:n], signed=False).permute(0, 2, 3, 1).numpy()

        def compute(domain=domain, variant=variant, data=data, n=n) -> dict[str, float]:
            model = base_models.load_variant(cfg, domain, variant)
            samples = base_models.generate(model, list(data.heldout_captions[:n]), steps, guidance, seed=int(cfg["seed"]))
            with torch.no_grad():
                trips = decode_images(model, model.encode_images(image_tensor(data.heldout_images[:n])))
            samples, trips = samples.permute(0, 2, 3, 1).numpy(), trips.permute(0, 2, 3, 1).numpy()
            return {**{f"samples: {k}": v for k, v in colour_dispersion(held, samples).items()},
                    **{f"VAE round trips: {k}": v for k, v in colour_dispersion(held, trips).items()},
                    **colour_mean_slopes(held, trips)}

        parts = {"what": "ch02 colour dispersion", "model": result.key, "n": n, "guidance": guidance, "steps": steps,
                 "seed": int(cfg["seed"])}
        rows[domain] = result_cache.cached(parts, compute, kind="json", cfg=cfg,
                                           code=["ctrlgen.experiments.ch02_background"])
    frame = pd.DataFrame(rows).T
    frame.index.name = "domain"
    return frame


def quality_curve_figure(curve: pd.DataFrame, per_row: int = 6):
    """One panel per domain and quantity: the value against training minutes, the threshold dashed, the chosen
    point (the final model the chapters use) ringed; green where it passes. Each domain starts a new row of at
    most ``per_row`` panels."""
    domains = list(dict.fromkeys(curve["domain"]))
    panels = {d: list(dict.fromkeys(zip(*(curve.loc[curve["domain"] == d, k] for k in ("criterion", "quantity")))))
              for d in domains}
    rows_of = {d: -(-len(q) // per_row) for d, q in panels.items()}
    n_rows = sum(rows_of.values())
    fig, axes = plt.subplots(n_rows, per_row, figsize=(2.4 * per_row, 2.1 * n_rows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat:
        ax.set_axis_off()
    first = 0
    for domain in domains:
        for k, (criterion, quantity) in enumerate(panels[domain]):
            ax = axes[first + k // per_row, k % per_row]
            ax.set_axis_on()
            rows = curve[(curve["domain"] == domain) & (curve["criterion"] == criterion) & (curve["quantity"] == quantity)]
            rows = rows.sort_values("minutes")
            ax.plot(rows["minutes"], rows["value"], "-", color="0.5")
            ax.scatter(rows["minutes"], rows["value"], c=[{"pass": "tab:green", "info": "0.5"}.get(s, "tab:red") for s in rows["status"]],
                       s=18, zorder=3)
            chosen = rows[rows["chosen"]]
            ax.scatter(chosen["minutes"], chosen["value"], s=90, facecolors="none", edgecolors="k", zorder=4)
            if rows["threshold"].notna().any():
                ax.axhline(float(rows["threshold"].dropna().iloc[-1]), ls="--", color="k", lw=0.8)
            short = quantity if len(quantity) < 26 else quantity[:24] + "…"
            ax.set_title(f"{domain} · {criterion}\n{short}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("training minutes", fontsize=6)
        first += rows_of[domain]
    return fig


def quality_bar_lines(bar: pd.DataFrame, defaults: Mapping[str, str]) -> list[str]:
    """Per domain: does its default base model pass, and if not, which criteria fail and by how much."""
    lines = []
    for domain, variant in defaults.items():
        rows = bar.sort_index().loc[(domain, variant)]  # sorted: no lexsort-depth warning on a MultiIndex
        failing = rows[rows["status"].isin(["fail", "undefined"])]  # "info" rows have no threshold
        if failing.empty:
            lines.append(f"{domain} ({variant}): passes every criterion")
            continue
        parts = [f"{c} / {q}: {r['value']:.3g} vs {r['threshold']:.3g} ({r['status']})" for (c, q), r in failing.iterrows()]
        measured = int((rows["status"] != "info").sum())
        lines.append(f"{domain} ({variant}): {len(failing)} of {measured} not passed — " + "; ".join(parts))
    return lines


def _smooth(values: Sequence[float], smooth: int) -> np.ndarray:
    v = np.asarray(values, float)
    k = max(1, min(smooth, len(v) // 5 or 1))
    return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) >= k else v


def loss_curves_figure(results: Mapping[str, Mapping[str, Any]], smooth: int = 25):
    """One panel per domain: VAE loss and each variant's L_rec (and the auxiliary term), smoothed."""
    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 5), squeeze=False)
    for j, (domain, variants) in enumerate(results.items()):
        first = next(iter(variants.values()))
        axes[0, j].plot(_smooth([h["loss"] for h in first.vae_history], smooth), color="tab:brown")
        axes[0, j].set_title(f"{domain}: VAE loss", fontsize=9)
        for v, r in variants.items():
            axes[1, j].plot(_smooth([h["rec"] for h in r.history], smooth), label=f"{v}: L_rec")
            if r.history and "sa_struct" in r.history[0]:
                axes[1, j].plot(_smooth([h["sa_struct"] for h in r.history], smooth), ls="--", label=f"{v}: SA structure")
        axes[1, j].set_title(f"{domain}: U-Net losses", fontsize=9)
        axes[1, j].set_xlabel("step")
        axes[1, j].legend(fontsize=7)
        for ax in axes[:, j]:
            ax.set_yscale("log")
    fig.tight_layout()
    return fig


def _hwc(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) for ``imshow``."""
    return x.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


@torch.no_grad()
def vae_round_trip_figure(models: Mapping[str, Any], datas: Mapping[str, DomainData], n: int = 6):
    """Held-out images (top) and their VAE reconstructions (bottom) for each domain (Eq. 2.26's encoder/decoder)."""
    fig, axes = plt.subplots(2 * len(models), n, figsize=(1.4 * n, 2.9 * len(models)), squeeze=False)
    for k, (domain, model) in enumerate(models.items()):
        held = datas[domain].heldout_images[:n]
        x, rec = image_tensor(held, signed=False), decode_images(model, model.encode_images(image_tensor(held)))
        for i in range(n):
            for row, src in ((2 * k, x), (2 * k + 1, rec)):
                ax = axes[row, i]
                ax.axis("off")
                if i < len(x):
                    ax.imshow(_hwc(src[i]))
        axes[2 * k, 0].set_title(f"{domain}: held-out", fontsize=8, loc="left")
        axes[2 * k + 1, 0].set_title(f"{domain}: VAE round trip", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def derm_real_maps(cfg: Mapping[str, Any], base: BaseModels, n: int = 32) -> dict[str, dict[str, torch.Tensor]]:
    """``analysis.attention_views.real_maps`` of every derm variant on the first ``n`` held-out images, noised to
    the profile's ``pretrain.measure.timestep``."""
    data = base.datas["derm"]
    idx = list(range(min(len(data.heldout_images), n)))
    return {v: real_maps(base_models.load_variant(cfg, "derm", v), data, idx, t=cfg["pretrain"]["measure"]["timestep"],
                         seed=cfg["seed"]) for v in base.results["derm"]}


def nu_tau_table(real: Mapping[str, Mapping[str, torch.Tensor]], token: int, nu: float = 2.0,
                 taus: Sequence[float] = (0, 1, 2, 4)) -> pd.DataFrame:
    """Mean IoU of Otsu(map) with the lesion mask for A_C, A_C^ν and Â_C ⊗ A_S^τ (Eq. 3.2), one column per variant."""
    table = pd.concat({v: nu_tau_iou(m, token, region=1, nu=nu, taus=taus) for v, m in real.items()}, axis=1)
    table.columns = [c[0] for c in table.columns]
    return table


def refinement_ious(maps: Mapping[str, torch.Tensor], token: int, tau: float = 4.0,
                    region: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the IoU with the true region of Otsu(A_S^τ · A_C) (Eq. 2.29, refined) and of Otsu(A_C) (τ = 0).

    ``maps`` is one model's ``real_maps``; both masks are Otsu's threshold without morphology, and two empty
    masks agree (IoU 1, ``metrics.overlap.iou``). The two arrays are paired image by image."""
    cross = maps["cross"][..., token]
    truth = maps["labels"] == region
    refined = iou(otsu_mask(self_enhance(cross, maps["self"], tau), dilate=0, erode=0), truth)
    plain = iou(otsu_mask(cross, dilate=0, erode=0), truth)
    return refined, plain


@dataclass
class Affinity:
    """Self-attention affinity of every model with true regions: per-layer/head tables, their summary, skips."""

    tables: dict[str, pd.DataFrame]
    summary: pd.DataFrame
    skipped: list[str]

    @property
    def per_head(self) -> pd.DataFrame:
        """Affinity ratio and diagonal mass per (model, layer, head)."""
        frame = pd.concat(self.tables, names=["model"]).reset_index(level=0).set_index(["model", "layer", "head"])
        return frame[["affinity_ratio", "diagonal_mass"]]

    def ratio(self, domain: str, variant: str) -> float:
        """The layer-mean map's affinity ratio of one model (NaN when it was not measured)."""
        key = (domain, variant)
        return float(self.summary.loc[key, "affinity (layer-mean map)"]) if key in self.summary.index else float("nan")


def affinity(cfg: Mapping[str, Any], base: BaseModels) -> Affinity:
    """``base_models.affinity_for`` of every variant of every domain (domains without true regions are skipped)."""
    tables, summary, skipped = {}, {}, []
    for domain, variants in base.results.items():
        for v in variants:
            table = base_models.affinity_for(cfg, base_models.load_variant(cfg, domain, v), base.datas[domain])
            if table is None:
                skipped.append(f"{domain}/{v}: affinity ratio not measured — {base.datas[domain].notes}")
                continue
            tables[f"{domain}/{v}"] = table
            summary[(domain, v)] = summarize_affinity(table)
    frame = pd.DataFrame(summary).T
    frame.index.names = ["domain", "variant"]
    return Affinity(tables, frame, skipped)


def choice_lines(cfg: Mapping[str, Any], base: BaseModels, aff: Affinity, quality: pd.DataFrame,
                 nu_tau: pd.DataFrame) -> list[str]:
    """The evidence behind the choice of default base model, one line per domain, then the ν/τ summary."""
    lines = []
    for d, variants in base.results.items():
        ratios = ", ".join(f"{v} {aff.ratio(d, v):.3f}" for v in variants)
        errors = ", ".join(f"{v} {quality.loc[(d, v), 'heldout loss t=500']:.4f}" for v in variants)
        lines.append(f"{d}: affinity ratio of the layer-mean 16x16 map — {ratios}; held-out L_rec at t=500 — {errors}")
    lines.append("Otsu IoU with the lesion mask, τ = 0 → 4: "
                 + str({v: f"{nu_tau.iloc[1][v]:.3f} → {nu_tau.iloc[-1][v]:.3f}" for v in nu_tau.columns}))
    lines.append(f"default base model per domain: {default_variants(cfg)}")
    return lines


def default_variants(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The profile's default base-model variant of every domain."""
    out = {d: base_models.default_variant(cfg, d) for d in base_models.DOMAINS}
    if str(cfg["models"]["kind"]) == "mini":  # chapter 3 starts from the word-aligned scenes model
        out[word_alignment.DOMAIN] += ALIGNED
    return out
