"""Attention made visible on the book's own models (chapter 2, second half): data for the figures and the figures.
Chapter 2's pretraining figures (loss curves, VAE round trip) are ``ctrlgen.experiments.ch02_background``'s.

Everything works on ``SDComponents`` and ``ctrlgen.data.domains.DomainData``; functions that compute
return arrays/frames, functions named ``*_figure`` return matplotlib figures. Images come and go in the
book's convention (``ctrlgen.sampling.pipeline``): float ``(B, 3, H, W)`` in [0, 1].
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ctrlgen.attention import AttentionCapture, otsu_mask, resize_maps, self_enhance, suppress
from ctrlgen.attention.layers import available_resolutions
from ctrlgen.data.tensors import image_tensor
from ctrlgen.metrics.overlap import iou
from ctrlgen.sampling import text_to_image


def _img(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) for ``imshow``."""
    return x.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


def prompt_tokens(model, prompt: str) -> list[tuple[int, str]]:
    """(position, token) of the prompt's own tokens (start and end tokens excluded)."""
    ids = model.tokenizer(prompt)["input_ids"]
    toks = model.tokenizer.convert_ids_to_tokens(ids)
    return [(i, t.replace("</w>", "")) for i, t in enumerate(toks)][1:-1]


# ------------------------------------------------------------------------------------------- samples
def samples_figure(samples: Mapping[str, torch.Tensor], prompts: Sequence[str], title: str = ""):
    """Rows = models (e.g. variants), columns = prompts; ``samples``: images ``(N, 3, H, W)`` in [0, 1] per model."""
    rows, n = len(samples), len(prompts)
    fig, axes = plt.subplots(rows, n, figsize=(1.6 * n, 1.8 * rows + 0.4), squeeze=False)
    for r, (name, imgs) in enumerate(samples.items()):
        for c in range(n):
            axes[r, c].imshow(_img(imgs[c]))
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8)
    for c, p in enumerate(prompts):
        axes[0, c].set_title(p.replace("an image of a ", "").replace("a chest x-ray with ", "cxr: ")
                             .replace("a photo of ", ""), fontsize=5.5, wrap=True)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------- cross-attention
@torch.no_grad()
def cross_attention_trajectory(model, prompt: str, num_steps: int, guidance: float = 3.0, seed: int = 0,
                               keep: int = 4) -> dict[str, Any]:
    """Sample one image for ``prompt`` and keep the per-layer cross-attention maps at ``keep`` steps.

    Returns ``{"image": (3, H, W) in [0, 1], "steps": [(i, t)], "maps": {(i, layer): (h, w, T)}, "mean": {i: (h, w, T)}}``
    with ``mean`` the layer mean at the largest cross-attention side.
    """
    unet = model.unet
    sides = available_resolutions(unet, "cross")
    chosen = set(np.linspace(0, num_steps - 1, keep).round().astype(int).tolist())
    kept: dict[str, Any] = {"maps": {}, "mean": {}, "steps": []}
    with AttentionCapture(unet, cross_res=sides, self_res=(), per_layer=True) as store:
        def grab(i, t, _):
            if i in chosen:
                kept["steps"].append((i, int(t)))
                for name, m in store.layers.items():
                    side = int(round(m.shape[1] ** 0.5))
                    kept["maps"][(i, name)] = m[0].reshape(side, side, -1).clone()
                kept["mean"][i] = store.cross(sides[0])[0].clone()
        out = text_to_image(model, [prompt], num_steps=num_steps, guidance_scale=guidance, seed=seed, store=store,
                            callback=grab)
    kept["image"] = out.images[0]
    return kept


def cross_attention_figure(traj: Mapping[str, Any], tokens: Sequence[tuple[int, str]], title: str = ""):
    """Tokens (columns) x kept timesteps (rows) of the layer-mean map, next to the generated image."""
    steps = traj["steps"]
    fig, axes = plt.subplots(len(steps), len(tokens) + 1, figsize=(1.3 * (len(tokens) + 1), 1.35 * len(steps) + 0.4),
                             squeeze=False)
    for r, (i, t) in enumerate(steps):
        m = traj["mean"][i]
        if r == 0:
            axes[r, 0].imshow(_img(traj["image"]))
            axes[r, 0].set_title("sample", fontsize=7)
        else:
            axes[r, 0].set_frame_on(False)
        axes[r, 0].set_ylabel(f"t = {t}", fontsize=7)
        for c, (pos, tok) in enumerate(tokens, 1):
            axes[r, c].imshow(m[..., pos].numpy(), cmap="inferno")
            if r == 0:
                axes[r, c].set_title(tok, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or "cross-attention per token across timesteps (layer mean)", fontsize=9)
    fig.tight_layout()
    return fig


def cross_attention_layers_figure(traj: Mapping[str, Any], tokens: Sequence[tuple[int, str]], step_index: int | None = None):
    """Every cross-attention layer (rows) x tokens (columns) at one kept step."""
    steps = traj["steps"]
    i, t = steps[len(steps) // 2] if step_index is None else next(s for s in steps if s[0] == step_index)
    layers = [name for (j, name) in traj["maps"] if j == i and "attn2" in name]
    fig, axes = plt.subplots(len(layers), len(tokens), figsize=(1.2 * len(tokens), 1.25 * len(layers) + 0.4), squeeze=False)
    for r, name in enumerate(layers):
        m = traj["maps"][(i, name)]
        for c, (pos, tok) in enumerate(tokens):
            axes[r, c].imshow(m[..., pos].numpy(), cmap="inferno")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(tok, fontsize=7)
        axes[r, 0].set_ylabel(f"{_short(name)}\n{m.shape[0]}x{m.shape[1]}", fontsize=6)
    fig.suptitle(f"cross-attention per layer at t = {t}", fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------- real maps
@torch.no_grad()
def real_maps(model, data, indices: Sequence[int], t: int = 500, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cross- and self-attention maps of held-out images noised to ``t`` under their own captions.

    Returns ``cross`` (B, s, s, T) and ``self`` (B, s*s, s*s) at the latent side (layer means over
    every place), ``labels`` (B, s, s) the true regions at that side (nearest), ``images`` (B, H, W, 3).
    """
    idx = list(indices)
    x = image_tensor(data.heldout_images[idx])
    z = model.encode_images(x)
    side = z.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    tt = torch.full((len(idx),), int(t), dtype=torch.long)
    noisy = model.noise_scheduler().add_noise(z, torch.randn(z.shape, generator=gen), tt)
    emb = model.encode_prompt([data.heldout_captions[i] for i in idx])
    with AttentionCapture(model.unet, cross_res=(side,), self_res=(side,)) as store:
        model.unet(noisy, tt, encoder_hidden_states=emb)
    out = {"cross": store.cross(side), "self": store.self_attention(side), "images": data.heldout_images[idx]}
    if data.heldout_regions is not None:
        lab = torch.from_numpy(data.heldout_regions[idx]).float()[:, None]
        out["labels"] = torch.nn.functional.interpolate(lab, size=(side, side), mode="nearest")[:, 0].long()
    return out


def self_attention_queries_figure(maps_by_model: Mapping[str, Mapping[str, torch.Tensor]], image_index: int = 0,
                                  queries: Sequence[tuple[int, int]] | None = None):
    """Rows = models; columns = the image (queries marked) and the self-attention map of each query pixel."""
    first = next(iter(maps_by_model.values()))
    side = first["cross"].shape[1]
    if queries is None:
        lab = first.get("labels")
        queries = []
        if lab is not None:
            for region in torch.unique(lab[image_index]).tolist()[:3]:
                ys, xs = torch.nonzero(lab[image_index] == region, as_tuple=True)
                k = len(ys) // 2
                queries.append((int(ys[k]), int(xs[k])))
        queries = queries or [(side // 2, side // 2), (1, 1)]
    rows = len(maps_by_model)
    fig, axes = plt.subplots(rows, len(queries) + 1, figsize=(1.6 * (len(queries) + 1), 1.7 * rows + 0.3), squeeze=False)
    colours = ["cyan", "lime", "magenta", "yellow"]
    for r, (name, maps) in enumerate(maps_by_model.items()):
        img = maps["images"][image_index]
        axes[r, 0].imshow(img)
        scale = img.shape[0] / side
        for k, (qy, qx) in enumerate(queries):
            axes[r, 0].scatter([(qx + 0.5) * scale], [(qy + 0.5) * scale], s=25, c=colours[k % 4], edgecolors="k")
            a = maps["self"][image_index, qy * side + qx].reshape(side, side).numpy()
            axes[r, k + 1].imshow(a, cmap="viridis")
            axes[r, k + 1].scatter([qx], [qy], s=20, c=colours[k % 4], edgecolors="k")
        axes[r, 0].set_ylabel(name, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("self-attention of a few query pixels (held-out image, t = 500, layer mean)", fontsize=9)
    fig.tight_layout()
    return fig


def nu_tau_maps(maps: Mapping[str, torch.Tensor], token: int, nu: float = 2.0, taus: Sequence[float] = (0, 1, 2, 4)
                ) -> dict[str, torch.Tensor]:
    """``A_C`` of one token, ``Â_C = A_C^ν`` (Eq. 3.2 left) and ``Â_C ⊗ A_S^τ`` (Eq. 3.2 right) for each τ."""
    a = maps["cross"][..., token]
    hat = suppress(a, nu)
    out = {"A_C": a, f"A_C^ν (ν={nu:g})": hat}
    for tau in taus:
        if tau > 0:
            out[f"Â_C ⊗ A_S^τ (τ={tau:g})"] = self_enhance(hat, maps["self"], tau)
    return out


def nu_tau_iou(maps: Mapping[str, torch.Tensor], token: int, region: int = 1, nu: float = 2.0,
               taus: Sequence[float] = (0, 1, 2, 4)) -> pd.DataFrame:
    """IoU of Otsu(map) with the true region, per map of ``nu_tau_maps`` (mean over the images)."""
    lab = maps["labels"] == region
    rows = {}
    for name, m in nu_tau_maps(maps, token, nu, taus).items():
        masks = otsu_mask(m, dilate=0, erode=0)
        rows[name] = float(iou(masks, lab).mean())  # two empty masks agree (IoU 1), as everywhere in the book
    return pd.DataFrame({"IoU of Otsu(map) with the true mask": rows})


def nu_tau_figure(maps_by_model: Mapping[str, Mapping[str, torch.Tensor]], token: int, image_index: int = 0,
                  nu: float = 2.0, taus: Sequence[float] = (0, 1, 4)):
    """Rows = models; columns = image with true mask, A_C, A_C^ν, and the enhanced maps for each τ > 0."""
    rows = len(maps_by_model)
    panels = {name: nu_tau_maps(m, token, nu, taus) for name, m in maps_by_model.items()}
    ncol = 1 + len(next(iter(panels.values())))
    fig, axes = plt.subplots(rows, ncol, figsize=(1.7 * ncol, 1.8 * rows + 0.3), squeeze=False)
    for r, (name, maps) in enumerate(maps_by_model.items()):
        axes[r, 0].imshow(maps["images"][image_index])
        if "labels" in maps:
            lab = resize_maps(maps["labels"][image_index].float(), maps["images"].shape[1], mode="nearest")
            axes[r, 0].contour(lab.numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        axes[r, 0].set_ylabel(name, fontsize=8)
        for c, (title, m) in enumerate(panels[name].items(), 1):
            axes[r, c].imshow(m[image_index].numpy(), cmap="inferno")
            if r == 0:
                axes[r, c].set_title(title, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def _short(layer: str) -> str:
    """``up_blocks.1.attentions.0.transformer_blocks.0.attn1`` -> ``up1.a0``."""
    return (layer.split(".transformer_blocks")[0].replace("_blocks.", "").replace("_block", "")
            .replace(".attentions.", ".a"))


def affinity_heatmap_figure(tables: Mapping[str, pd.DataFrame]):
    """Affinity ratio per layer (rows) and head (columns), one panel per (domain, variant)."""
    fig, axes = plt.subplots(1, len(tables), figsize=(3.3 * len(tables), 2.8), squeeze=False)
    for ax, (name, t) in zip(axes[0], tables.items()):
        heads = t[(t["head"] != "mean") & (t["place"] != "all")]
        pivot = heads.pivot_table(index="layer", columns="head", values="affinity_ratio")
        pivot = pivot[sorted(pivot.columns, key=int)]
        im = ax.imshow(pivot.to_numpy(), cmap="magma", vmin=0.9, vmax=max(1.2, float(np.nanmax(pivot.to_numpy()))))
        ax.set_yticks(range(len(pivot.index)))
        ax.set_yticklabels([_short(s) for s in pivot.index], fontsize=7)
        ax.set_xticks(range(len(pivot.columns)))
        ax.set_xticklabels(pivot.columns, fontsize=7)
        ax.set_xlabel("head", fontsize=8)
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("affinity ratio per self-attention layer and head (1 = no structure)", fontsize=9)
    fig.tight_layout()
    return fig
