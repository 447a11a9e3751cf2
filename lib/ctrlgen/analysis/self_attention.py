"""Self-attention structure of a U-Net, per layer and head (NOTES-mini-feasibility.md, chapter 2).

Affinity ratio (``ctrlgen.attention.affinity_ratio``): for each query pixel, the self-attention mass
landing in the query's own region divided by that region's area fraction, averaged over query
pixels; 1.0 = no structure (uniform attention), K = a perfect same-region affinity over K regions
(2.0 for lesion/skin). Measured on held-out images noised to one timestep (NOTES: t = 500) with the
regions taken from the true masks, for every self-attention layer at the chosen sides, for each head
and for the head mean. Diagonal mass (the attention a pixel pays to itself) is reported beside it:
uniform attention over N pixels gives 1/N.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ctrlgen.attention.capture import AttentionCapture
from ctrlgen.attention.layers import PLACES, select_layers
from ctrlgen.attention.maps import affinity_ratio, diagonal_mass


@torch.no_grad()
def head_self_attention(unet: torch.nn.Module, noisy: torch.Tensor, t: int | torch.Tensor, emb: torch.Tensor,
                        res: Sequence[int] = (16,), places: Sequence[str] = PLACES) -> dict[str, tuple[object, torch.Tensor]]:
    """``{layer name: (AttentionLayer, (B, heads, N, N) probabilities)}`` for the self-attention layers at ``res``."""
    with AttentionCapture(unet, cross_res=(), self_res=res, places=places, latent_size=tuple(noisy.shape[-2:]),
                          per_head=True, allow_large_self=True) as store:
        unet(noisy, t, encoder_hidden_states=emb)
    return {layer.name: (layer, store.layers[layer.name]) for layer in store_layers(unet, res, places, noisy)}


def store_layers(unet: torch.nn.Module, res: Sequence[int], places: Sequence[str], noisy: torch.Tensor):
    """The self-attention layers ``head_self_attention`` reads, in the U-Net's order."""
    return select_layers(unet, "self", res, places, tuple(noisy.shape[-2:]))


def affinity_table(model, latents: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, t: int = 500,
                   res: Sequence[int] = (16,), places: Sequence[str] = PLACES, batch_size: int = 25,
                   seed: int = 0) -> pd.DataFrame:
    """Affinity ratio and diagonal mass per self-attention layer and head (plus head mean and layer mean).

    Args:
        model: ``SDComponents`` (U-Net, text encoder, noise schedule are used).
        latents: ``(B, C, h, w)`` scaled latents of held-out images; ``input_ids`` their prompts.
        labels: ``(B, H, W)`` integer region labels from the true masks (nearest-neighbour resized).
        t: the timestep the latents are noised to (one fixed noise draw from ``seed``).
    Images with a single region (where every map scores exactly 1) are left out.
    Returns one row per (layer, head) with columns layer, place, side, head, affinity_ratio,
    diagonal_mass, uniform_diagonal, n_images; head "mean" is the head-mean map of the layer and
    layer "all (mean map)" the mean of the head-mean maps over the layers of a side (what
    ``AttentionCapture`` returns).
    """
    keep = torch.tensor([len(torch.unique(l)) > 1 for l in labels])
    latents, input_ids, labels = latents[keep], input_ids[keep], labels[keep]
    if len(latents) == 0:
        raise ValueError("no image has two or more regions: the affinity ratio is undefined")
    sched = model.noise_scheduler()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)
    tt = torch.full((latents.shape[0],), int(t), dtype=torch.long)
    noisy = sched.add_noise(latents, noise, tt)
    sums: dict[tuple, list] = {}
    meta: dict[str, tuple] = {}
    for i in range(0, len(latents), batch_size):
        sl = slice(i, i + batch_size)
        emb = model.encode_ids(input_ids[sl])
        maps = head_self_attention(model.unet, noisy[sl], tt[sl], emb, res, places)
        by_side: dict[int, list[torch.Tensor]] = {}
        for name, (layer, probs) in maps.items():
            side = int(round(probs.shape[-1] ** 0.5))
            meta[name] = (layer.place, side)
            mean = probs.mean(1)
            by_side.setdefault(side, []).append(mean)
            for h in range(probs.shape[1]):
                _acc(sums, (name, h), probs[:, h], labels[sl])
            _acc(sums, (name, "mean"), mean, labels[sl])
        for side, ms in by_side.items():
            meta[f"all {side}x{side} (mean map)"] = ("all", side)
            _acc(sums, (f"all {side}x{side} (mean map)", "mean"), torch.stack(ms).mean(0), labels[sl])
    rows = []
    for (name, head), (ratios, diags) in sums.items():
        place, side = meta[name]
        rows.append({"layer": name, "place": place, "side": side, "head": str(head),
                     "affinity_ratio": float(np.mean(ratios)), "diagonal_mass": float(np.mean(diags)),
                     "uniform_diagonal": 1.0 / side**2, "n_images": len(ratios)})
    return pd.DataFrame(rows)


def _acc(sums: dict, key: tuple, maps: torch.Tensor, labels: torch.Tensor) -> None:
    r = affinity_ratio(maps.float(), labels).tolist()
    d = diagonal_mass(maps.float()).tolist()
    entry = sums.setdefault(key, ([], []))
    entry[0].extend(r)
    entry[1].extend(d)


def summarize_affinity(table: pd.DataFrame) -> dict[str, float]:
    """Headline numbers of an ``affinity_table``: the layer-mean map of the largest side, the down-block
    head means, the best single head, the mean diagonal mass and its uniform value."""
    side = int(table["side"].max())
    t = table[table["side"] == side]
    allmean = t[t["place"] == "all"]
    down = t[(t["place"] == "down") & (t["head"] == "mean")]
    heads = t[(t["head"] != "mean") & (t["place"] != "all")]
    return {
        "affinity (layer-mean map)": float(allmean["affinity_ratio"].iloc[0]) if len(allmean) else float("nan"),
        "affinity (down-block head mean)": float(down["affinity_ratio"].mean()) if len(down) else float("nan"),
        "affinity (best head)": float(heads["affinity_ratio"].max()) if len(heads) else float("nan"),
        "diagonal mass (layer-mean map)": float(allmean["diagonal_mass"].iloc[0]) if len(allmean) else float("nan"),
        "diagonal mass if uniform": 1.0 / side**2,
    }
