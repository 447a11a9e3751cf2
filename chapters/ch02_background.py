# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (ctrlgen)
#     language: python
#     name: ctrlgen
# ---

# %% [markdown]
# # Chapter 2 — Diffusion models, from the forward process to sampling
#
# Thesis chapter 2 reviews the generative models the four methods build on. This first half makes
# §2.1.3 executable on a distribution small enough to see: the forward process in closed form against
# the Markov chain it summarises, a noise-prediction network trained with $L_{DDPM}$ (Eq. 2.23), and
# the same network sampled two ways — ancestrally (Eq. 2.24) and deterministically with DDIM.
# Everything below is computed by this run; the thesis reports no numbers for this section.

# %% tags=["parameters"]
profile = "mini"
overrides = {}

# %%
import numpy as np
import pandas as pd
import torch
import matplotlib.pyplot as plt

from ctrlgen import load_profile, toy2d, viz
from ctrlgen.metrics.distribution import sliced_wasserstein
from ctrlgen.results import ChapterRun
from ctrlgen.seeding import seed_everything

cfg = load_profile(profile, overrides)
toy = cfg.ch02.toy
run = ChapterRun("ch02_background", cfg)
seed_everything(cfg.seed)
torch.set_num_threads(min(2, torch.get_num_threads()))
print(f"profile {cfg.profile_name}: {toy.distribution}, {toy.train_steps} training steps, T = {toy.num_train_timesteps}")

# %% [markdown]
# ## The forward process: one closed form for a chain of Gaussians
#
# Each step of the forward process scales the previous sample by $\sqrt{\alpha_t}$ and adds noise of
# variance $1-\alpha_t$ (Eq. 2.12). Composing $t$ such steps (Eq. 2.11) gives again a Gaussian,
# $q(x_t\mid x_0)=\mathcal N(\sqrt{\bar\alpha_t}\,x_0,(1-\bar\alpha_t)I)$ with $\bar\alpha_t=\prod_{s\le t}\alpha_s$ —
# which is what lets training jump to any $t$ in one draw. We check it two ways. First exactly: the
# recursion $m_t=\sqrt{\alpha_t}m_{t-1}$, $v_t=\alpha_t v_{t-1}+(1-\alpha_t)$ follows the chain without ever
# forming $\bar\alpha_t$.

# %%
ddpm = toy2d.make_scheduler("ddpm", toy.num_train_timesteps, toy.beta_schedule)
check_t = [0, 10, 50, 100, 250, 500, 750, toy.num_train_timesteps - 1]
rows = []
for t in check_t:
    m, v = toy2d.chain_moments(ddpm.alphas, t)
    abar = float(ddpm.alphas_cumprod[t])
    rows.append({"t": t, "chain mean coef.": m, "√ᾱ_t": abar ** 0.5, "chain variance": v, "1 − ᾱ_t": 1 - abar})
moments = pd.DataFrame(rows).set_index("t")
max_gap = float(max((moments["chain mean coef."] - moments["√ᾱ_t"]).abs().max(),
                    (moments["chain variance"] - moments["1 − ᾱ_t"]).abs().max()))
run.log_metric("ch02.forward", "exact moments", "max |chain − closed form|", max_gap)
moments.style.format("{:.6f}")

# %% [markdown]
# Second, by simulation: push the same data points through the iterated chain and through the closed
# form, and compare the two clouds (sliced Wasserstein-1 distance, and the distance between two
# independent closed-form draws as the Monte-Carlo floor).

# %%
x0 = torch.from_numpy(toy2d.sample_toy(toy.distribution, toy.chain_samples, seed=cfg.seed))
gen = torch.Generator().manual_seed(cfg.seed + 1)
panels, sim_rows = {}, []
for t in (50, 200, toy.num_train_timesteps - 1):
    chain = toy2d.forward_chain(ddpm, x0, t, gen).numpy()
    closed = toy2d.forward_closed_form(ddpm, x0, t, torch.randn(x0.shape, generator=gen)).numpy()
    closed2 = toy2d.forward_closed_form(ddpm, x0, t, torch.randn(x0.shape, generator=gen)).numpy()
    sim_rows.append({"t": t, "SW(chain, closed form)": sliced_wasserstein(chain, closed, seed=cfg.seed),
                     "SW(closed form, closed form) — floor": sliced_wasserstein(closed2, closed, seed=cfg.seed)})
    panels[f"chain, t={t}"], panels[f"closed form, t={t}"] = chain, closed
simulation = pd.DataFrame(sim_rows).set_index("t")
for t, row in simulation.iterrows():
    run.log_metric("ch02.forward", f"simulation t={t}", "SW(chain, closed form)", row.iloc[0])
    run.log_metric("ch02.forward", f"simulation t={t}", "SW floor", row.iloc[1])
simulation.style.format("{:.4f}")

# %%
fig = viz.scatter_panels(panels, limit=4, suptitle="Forward process: iterated chain vs closed form")
run.save_figure(fig, "forward_chain_vs_closed_form")
plt.show()

# %% [markdown]
# ## Training a noise predictor with $L_{DDPM}$
#
# A small MLP $\epsilon_\theta(x_t,t)$ learns to predict the noise that produced $x_t$ from $x_0$
# (Eq. 2.23), with $t$ uniform over the $T$ training steps and the closed form above providing $x_t$.

# %%
data = toy2d.sample_toy(toy.distribution, toy.n_data, seed=cfg.seed)
model = toy2d.EpsMLP(hidden=toy.hidden)
losses = toy2d.train_ddpm(model, data, ddpm, steps=toy.train_steps, batch_size=toy.batch_size, lr=toy.lr, seed=cfg.seed)
tail = float(np.mean(losses[-max(1, len(losses) // 10):]))
run.log_metric("ch02.toy", "training", "final L_DDPM (mean of last 10%)", tail)
fig = viz.curve(losses, "L_DDPM during training", "‖ε_θ − ε‖²")
run.save_figure(fig, "training_loss")
plt.show()

# %% [markdown]
# ## Two samplers, one model
#
# Ancestral sampling (Eq. 2.24, diffusers' `DDPMScheduler`) walks all $T$ steps and injects fresh
# noise at each. DDIM (`DDIMScheduler`, $\eta=0$) reuses the same network on a short subsequence of
# timesteps and is deterministic: the same $x_T$ always gives the same $x_0$. Both start here from the
# same $x_T$.

# %%
x_T = torch.randn((toy.n_samples, 2), generator=torch.Generator().manual_seed(cfg.seed + 2))
ddim = toy2d.make_scheduler("ddim", toy.num_train_timesteps, toy.beta_schedule)
ddpm_x0, ddpm_path = toy2d.sample(model, ddpm, x_T, toy.num_train_timesteps, seed=cfg.seed + 3,
                                  keep_every=toy.num_train_timesteps // 4)
ddim_x0, ddim_path = toy2d.sample(model, ddim, x_T, toy.ddim_steps, seed=cfg.seed + 3, keep_every=max(1, toy.ddim_steps // 4))
ddim_again, _ = toy2d.sample(model, ddim, x_T, toy.ddim_steps, seed=cfg.seed + 99)
ddpm_again, _ = toy2d.sample(model, ddpm, x_T, toy.num_train_timesteps, seed=cfg.seed + 99)
determinism = pd.DataFrame({
    "max |x₀ − x₀'| for the same x_T, another seed": [float((ddpm_x0 - ddpm_again).abs().max()),
                                                      float((ddim_x0 - ddim_again).abs().max())]},
    index=pd.Index([f"DDPM ancestral ({toy.num_train_timesteps} steps)", f"DDIM η=0 ({toy.ddim_steps} steps)"], name="sampler"))
run.log_table("ch02.determinism", determinism)
determinism

# %%
fig = viz.scatter_panels({"data": data[: toy.n_samples], f"DDPM, {toy.num_train_timesteps} steps": ddpm_x0.numpy(),
                          f"DDIM, {toy.ddim_steps} steps": ddim_x0.numpy(), "x_T (noise)": x_T.numpy()},
                         suptitle="Samples from the same model and the same x_T")
run.save_figure(fig, "ddpm_vs_ddim_samples")
plt.show()

# %%
fig = viz.scatter_panels({f"DDPM {i}/4": p.numpy() for i, p in enumerate(ddpm_path)}, suptitle="Ancestral trajectory")
run.save_figure(fig, "ddpm_trajectory")
plt.show()
fig = viz.scatter_panels({f"DDIM {i}/4": p.numpy() for i, p in enumerate(ddim_path)}, suptitle="DDIM trajectory")
run.save_figure(fig, "ddim_trajectory")
plt.show()

# %% [markdown]
# ## How well was the distribution learned?
#
# The sliced Wasserstein-1 distance between generated samples and fresh data, bracketed by two
# references computed the same way: a second independent draw of data (the best a perfect model can
# score with this many samples) and the Gaussian noise the samplers start from (the score of a model
# that learned nothing).

# %%
fresh = toy2d.sample_toy(toy.distribution, toy.n_samples, seed=cfg.seed + 7)
reference = toy2d.sample_toy(toy.distribution, toy.n_samples, seed=cfg.seed + 8)
distances = pd.DataFrame({"sliced W1 to data": {
    "data vs data (floor)": sliced_wasserstein(reference, fresh, seed=cfg.seed),
    f"DDPM ancestral ({toy.num_train_timesteps} steps)": sliced_wasserstein(ddpm_x0.numpy(), fresh, seed=cfg.seed),
    f"DDIM η=0 ({toy.ddim_steps} steps)": sliced_wasserstein(ddim_x0.numpy(), fresh, seed=cfg.seed),
    "x_T noise (ceiling)": sliced_wasserstein(x_T.numpy(), fresh, seed=cfg.seed),
}})
distances.index.name = "samples"
run.log_table("ch02.toy", distances)
distances.style.format("{:.4f}")

# %% [markdown]
# On the `mini` profile both samplers land close to the data floor and far below the noise ceiling; on
# `smoke` the network has trained for only a few seconds and the numbers only prove the cells run.

# %%
record = run.save()
print(run.stamp())
print(f"record: {record}")
