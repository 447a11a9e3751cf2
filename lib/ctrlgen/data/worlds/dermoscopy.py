"""Procedural dermoscopy world: lesion-on-skin scenes with ground truth by construction.

Every image is composed in CIELAB so that the quantities of thesis §5.3.2 are *controls*: the skin
region's mean L*, b* give a chosen skin ITA (hence a Fitzpatrick type), the lesion region's mean
gives ITA Lesion = ITA Skin − the chosen ITA Difference (lesion–skin contrast), and the lesion mask
is exact (a star-shaped region r < R(θ) with controllable area, irregularity and elongation).
Diagnosis-like classes (the seven HAM10000 diagnoses, in HAM10000's proportions) differ in contrast,
size, border irregularity, colour and internal structure (pigment network, blue-white veil, vessels,
central scar, scale). Skin texture, dermoscope vignette and hair are optional nuisances.

The generator is vectorised with numpy (a batch of images is one set of array operations) and
deterministic from its seed. ``write_*_layout`` write the scenes in the official ISIC 2018 Task 1,
HAM10000 / ISIC 2018 Task 3 and PH2 layouts so the real readers run on them unchanged.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.color import lab2rgb

from ctrlgen.data.attributes import FST_TYPES, area_ratio, circularity, fitzpatrick_type, ita_from_lab
from ctrlgen.data.worlds.common import draw_curves, grid, smooth_noise

# HAM10000 class proportions (Tschandl et al. 2018: 6705 NV of 10015 = 66.9 %).
HAM_PROPORTIONS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
# Skin ITA range per Fitzpatrick type (thesis §5.2 thresholds; open ends bounded for rendering).
FST_ITA_RANGES = {"I": (55.0, 68.0), "II": (41.0, 55.0), "III": (28.0, 41.0), "IV": (19.0, 28.0),
                  "V": (10.0, 19.0), "VI": (-25.0, 10.0)}


@dataclass(frozen=True)
class LesionStyle:
    """Appearance of one diagnosis-like class: distributions the generator samples from."""

    contrast: tuple[float, float]       # ITA Difference mean, sd (degrees)
    area: tuple[float, float]           # lesion area ratio range
    irregularity: tuple[float, float]   # border harmonic amplitude range
    lesion_a: tuple[float, float]       # a* (red-green) of the lesion
    delta_b: tuple[float, float]        # lesion b* − skin b*
    network: float = 0.0                # pigment-network amplitude (L*)
    centre_dark: float = 0.0            # darker centre (L*)
    blotches: float = 0.0               # multicolour blotch amplitude (L*)
    veil: float = 0.0                   # probability of a blue-white veil
    vessels: float = 0.0                # probability of red vessels
    scar: float = 0.0                   # central white scar (L*), dermatofibroma
    scale: float = 0.0                  # fine scaly texture (L*), actinic keratosis


STYLES: dict[str, LesionStyle] = {
    "nv": LesionStyle((42, 16), (0.05, 0.25), (0.01, 0.06), (10, 16), (4, 12), network=4, centre_dark=6, blotches=2),
    "mel": LesionStyle((52, 20), (0.10, 0.35), (0.08, 0.22), (12, 20), (0, 8), network=6, centre_dark=2, blotches=10,
                       veil=0.6, vessels=0.1),
    "bkl": LesionStyle((28, 14), (0.06, 0.30), (0.05, 0.14), (8, 14), (2, 8), network=1, blotches=6, scale=2),
    "bcc": LesionStyle((16, 12), (0.04, 0.20), (0.05, 0.14), (16, 26), (-4, 2), vessels=0.9, blotches=3),
    "akiec": LesionStyle((12, 10), (0.05, 0.25), (0.08, 0.20), (18, 28), (-2, 4), scale=6, blotches=3),
    "df": LesionStyle((26, 10), (0.02, 0.08), (0.01, 0.05), (12, 18), (2, 8), scar=16),
    "vasc": LesionStyle((30, 14), (0.02, 0.10), (0.02, 0.10), (30, 42), (-6, 0), blotches=8),
}


@dataclass(frozen=True)
class DermWorldConfig:
    """Controls of the dermoscopy world (profile section ``data.worlds.derm``)."""

    resolution: int = 64
    class_weights: Mapping[str, float] = field(default_factory=lambda: dict(HAM_PROPORTIONS))
    skin_type_weights: tuple[float, ...] = (0.25, 0.35, 0.2, 0.1, 0.06, 0.04)  # I..VI; ISIC is mostly light skin
    hair_probability: float = 0.3
    hair_mean: float = 4.0
    vignette_probability: float = 0.3
    texture: float = 1.0
    edge_px: float = 1.5       # soft lesion border width (pixels); the mask stays exact


def sample_parameters(n: int, seed: int, config: DermWorldConfig = DermWorldConfig(),
                      overrides: Mapping[str, object] | None = None) -> pd.DataFrame:
    """Draw the per-image controls (one row per image); ``overrides`` replace columns before the
    derived colours are computed, e.g. ``{"ita_difference": np.linspace(0, 80, n)}`` for a sweep."""
    rng = np.random.default_rng([seed, 1])
    classes = list(config.class_weights)
    p = np.asarray([config.class_weights[c] for c in classes], float)
    dx = np.asarray(classes, dtype=object)[rng.choice(len(classes), n, p=p / p.sum())]
    fst = np.asarray(FST_TYPES, dtype=object)[rng.choice(6, n, p=np.asarray(config.skin_type_weights) / sum(config.skin_type_weights))]
    lo, hi = np.array([FST_ITA_RANGES[t] for t in fst]).T
    u = rng.uniform(size=(12, n))
    style = [STYLES[d] for d in dx]
    col = lambda attr, i: np.array([getattr(s, attr)[i] for s in style])  # noqa: E731
    frame = pd.DataFrame({
        "dx": dx, "skin_ita": lo + u[0] * (hi - lo), "skin_b": 12 + 8 * u[1], "skin_a": 8 + 8 * u[2],
        "ita_difference": np.clip(col("contrast", 0) + col("contrast", 1) * rng.standard_normal(n), -10, 110),
        "delta_b": col("delta_b", 0) + u[3] * (col("delta_b", 1) - col("delta_b", 0)),
        "lesion_a": col("lesion_a", 0) + u[4] * (col("lesion_a", 1) - col("lesion_a", 0)),
        "target_area": col("area", 0) + u[5] * (col("area", 1) - col("area", 0)),
        "irregularity": col("irregularity", 0) + u[6] * (col("irregularity", 1) - col("irregularity", 0)),
        "aspect": 1.0 + 0.5 * u[7], "angle": np.pi * u[8],
        "cy": 0.5 + 0.08 * rng.standard_normal(n), "cx": 0.5 + 0.08 * rng.standard_normal(n),
        "hair_count": np.where(u[9] < config.hair_probability, rng.poisson(config.hair_mean, n) + 1, 0),
        "vignette": np.where(u[10] < config.vignette_probability, 0.62 + 0.12 * u[11], 0.0),
        "veil": rng.uniform(size=n) < np.array([s.veil for s in style]),
        "vessels": rng.uniform(size=n) < np.array([s.vessels for s in style]),
    })
    for key, value in (overrides or {}).items():
        frame[key] = np.broadcast_to(np.asarray(value), n).copy()
    return _derive_colours(frame)


def _derive_colours(frame: pd.DataFrame) -> pd.DataFrame:
    """Skin and lesion mean L*, a*, b* from the ITA controls (Eq. 5.1 inverted: L* = 50 + b*·tan ITA)."""
    frame = frame.copy()
    frame["skin_L"] = np.clip(50 + frame["skin_b"] * np.tan(np.radians(frame["skin_ita"])), 20, 92)
    frame["skin_ita"] = ita_from_lab(frame["skin_L"], frame["skin_b"])
    frame["lesion_b"] = np.maximum(frame["skin_b"] + frame["delta_b"], 3.0)
    target = np.clip(frame["skin_ita"] - frame["ita_difference"], -80, 85)
    frame["lesion_L"] = np.clip(50 + frame["lesion_b"] * np.tan(np.radians(target)), 6, 94)
    frame["lesion_ita"] = ita_from_lab(frame["lesion_L"], frame["lesion_b"])
    frame["ita_difference"] = frame["skin_ita"] - frame["lesion_ita"]
    return frame


def _lesion_geometry(params: pd.DataFrame, rng: np.random.Generator, size: int):
    """Distance to the lesion centre relative to the border R(θ) (<1 inside), per image; and θ."""
    n = len(params)
    yy, xx = grid(size, size)
    dy = yy[None] - params["cy"].to_numpy(np.float32)[:, None, None]
    dx = xx[None] - params["cx"].to_numpy(np.float32)[:, None, None]
    ang = params["angle"].to_numpy(np.float32)[:, None, None]
    aspect = params["aspect"].to_numpy(np.float32)[:, None, None]
    u = dx * np.cos(ang) + dy * np.sin(ang)
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) * aspect
    rho = np.sqrt(u**2 + v**2)
    theta = np.arctan2(v, u)
    k = np.arange(2, 8, dtype=np.float32)
    amps = rng.standard_normal((n, len(k))).astype(np.float32) / k
    amps /= np.linalg.norm(amps, axis=1, keepdims=True)
    phases = rng.uniform(0, 2 * np.pi, (n, len(k))).astype(np.float32)
    irr = params["irregularity"].to_numpy(np.float32)
    wobble = np.einsum("nk,nkhw->nhw", amps, np.cos(k[None, :, None, None] * theta[:, None] + phases[:, :, None, None]))
    # base radius so that the ellipse area matches the target area ratio (wobble adds ~0 on average)
    radius = np.sqrt(params["target_area"].to_numpy(np.float32) * aspect[:, 0, 0] / np.pi)
    border = radius[:, None, None] * (1 + 2.0 * irr[:, None, None] * wobble)
    return rho / np.maximum(border, 1e-3), border, theta


def _normalise_region(channel: np.ndarray, region: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Shift ``channel`` per image so its mean over ``region`` equals ``target`` (keeps the controls exact)."""
    count = np.maximum(region.sum(axis=(1, 2)), 1)
    mean = (channel * region).sum(axis=(1, 2)) / count
    return channel + (target - mean)[:, None, None]


def render(params: pd.DataFrame, resolution: int, seed: int, config: DermWorldConfig = DermWorldConfig()
           ) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and exact lesion masks (N, H, W) bool for a parameter table."""
    n, s = len(params), resolution
    rng = np.random.default_rng([seed, 2])
    rel, border, theta = _lesion_geometry(params, rng, s)
    mask = rel < 1.0
    edge = config.edge_px / s / np.maximum(border, 1e-3)
    alpha = np.clip(0.5 + (1.0 - rel) / np.maximum(edge * 2, 1e-6) / 1.0, 0, 1) if config.edge_px > 0 else mask.astype(np.float32)
    col = lambda name: params[name].to_numpy(np.float32)[:, None, None]  # noqa: E731
    tex = config.texture
    # skin: colour + low-frequency mottling + fine grain
    skin_L = col("skin_L") + tex * (3.0 * smooth_noise(rng, n, s, s, 5) + 1.0 * rng.standard_normal((n, s, s)).astype(np.float32))
    skin_a = col("skin_a") + tex * 2.0 * smooth_noise(rng, n, s, s, 4)
    skin_b = col("skin_b") + tex * 1.5 * smooth_noise(rng, n, s, s, 4)
    skin_region = ~mask
    skin_L = _normalise_region(skin_L, skin_region, col("skin_L")[:, 0, 0])
    skin_b = _normalise_region(skin_b, skin_region, col("skin_b")[:, 0, 0])
    # lesion: colour + class-specific internal structure
    styles = [STYLES[d] for d in params["dx"]]
    amp = lambda attr: np.array([getattr(st, attr) for st in styles], np.float32)[:, None, None]  # noqa: E731
    yy, xx = grid(s, s)
    period = rng.uniform(3.5, 6.0, n).astype(np.float32)[:, None, None] / s
    rot = rng.uniform(0, np.pi, n).astype(np.float32)[:, None, None]
    gy, gx = yy * np.cos(rot) - xx * np.sin(rot), yy * np.sin(rot) + xx * np.cos(rot)
    network = np.sin(2 * np.pi * gy / period) * np.sin(2 * np.pi * gx / period)
    blotch = smooth_noise(rng, n, s, s, 4)
    les_L = (col("lesion_L") + amp("network") * network * tex - amp("centre_dark") * (1 - np.clip(rel, 0, 1))
             + amp("blotches") * blotch + amp("scale") * rng.standard_normal((n, s, s)).astype(np.float32)
             + amp("scar") * np.exp(-(rel / 0.35) ** 2))
    les_a = col("lesion_a") + 3.0 * smooth_noise(rng, n, s, s, 3)
    les_b = col("lesion_b") + 0.3 * amp("blotches") * blotch - 0.2 * amp("scar") * np.exp(-(rel / 0.35) ** 2)
    veil = params["veil"].to_numpy(bool)[:, None, None] & (smooth_noise(rng, n, s, s, 3) > 0.25)
    les_L, les_b = les_L + 6.0 * veil, les_b - 12.0 * veil
    les_L = _normalise_region(les_L, mask, col("lesion_L")[:, 0, 0])
    les_b = _normalise_region(les_b, mask, col("lesion_b")[:, 0, 0])
    # vessels (red curves inside the lesion)
    owners = np.flatnonzero(params["vessels"].to_numpy(bool)).repeat(3)
    centre = params[["cy", "cx"]].to_numpy(np.float32)[owners]
    reach = np.sqrt(params["target_area"].to_numpy(np.float32)[owners])[:, None] * 0.5
    ctrl = [centre + reach * rng.uniform(-1, 1, (len(owners), 2)).astype(np.float32) for _ in range(3)]
    vessels = draw_curves((n, s, s), owners, *ctrl) * mask
    les_a = les_a + 22.0 * vessels
    les_L = les_L - 8.0 * vessels
    L = alpha * les_L + (1 - alpha) * skin_L
    a = alpha * les_a + (1 - alpha) * skin_a
    b = alpha * les_b + (1 - alpha) * skin_b
    # hair: dark curves over everything (the mask, as in ISIC, ignores hair)
    hair_owner = np.repeat(np.arange(n), params["hair_count"].to_numpy(int))
    m = len(hair_owner)
    start = rng.uniform(-0.1, 1.1, (m, 2)).astype(np.float32)
    direction = rng.standard_normal((m, 2)).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-6
    length = rng.uniform(0.3, 0.9, (m, 1)).astype(np.float32)
    bend = rng.normal(0, 0.12, (m, 2)).astype(np.float32)
    hair = draw_curves((n, s, s), hair_owner, start, start + direction * length / 2 + bend, start + direction * length,
                       width_px=1.0 + s / 128)
    L, a, b = L * (1 - hair) + 18.0 * hair, a * (1 - hair) + 4.0 * hair, b * (1 - hair) + 6.0 * hair
    # dermoscope vignette: dark outside a circle
    r_v = params["vignette"].to_numpy(np.float32)[:, None, None]
    dist = np.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2)[None]
    dark = np.where(r_v > 0, np.clip((dist - r_v) * s / 3.0, 0, 1), 0.0)
    L = L * (1 - 0.9 * dark)
    lab = np.stack([np.clip(L, 0, 100), a, b], axis=-1)
    with warnings.catch_warnings():  # a few out-of-gamut pixels are clipped, by design
        warnings.simplefilter("ignore", UserWarning)
        rgb = lab2rgb(lab.astype(np.float64))
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), mask


@dataclass(frozen=True)
class DermScenes:
    """A batch of generated scenes: images, exact masks and the ground-truth table."""

    images: np.ndarray
    masks: np.ndarray
    truth: pd.DataFrame


def generate_dermoscopy(n: int, seed: int = 0, config: DermWorldConfig = DermWorldConfig(),
                        overrides: Mapping[str, object] | None = None, chunk: int = 256) -> DermScenes:
    """Generate ``n`` scenes (see module doc). ``truth`` holds every control plus the measured
    ``area_ratio`` and ``circularity`` of the exact mask."""
    params = sample_parameters(n, seed, config, overrides)
    images, masks = [], []
    for i, start in enumerate(range(0, n, chunk)):
        part = params.iloc[start:start + chunk].reset_index(drop=True)
        img, msk = render(part, config.resolution, seed * 1000 + i, config)
        images.append(img)
        masks.append(msk)
    images = np.concatenate(images) if images else np.zeros((0, config.resolution, config.resolution, 3), np.uint8)
    masks = np.concatenate(masks) if masks else np.zeros((0, config.resolution, config.resolution), bool)
    truth = params.assign(area_ratio=area_ratio(masks) if n else [], circularity=circularity(masks) if n else [],
                          fitzpatrick=[t for t in _fst_of(params["skin_ita"])])
    return DermScenes(images, masks, truth)


def _fst_of(ita: pd.Series) -> np.ndarray:
    return fitzpatrick_type(ita.to_numpy(float))


def with_resolution(config: DermWorldConfig, resolution: int) -> DermWorldConfig:
    return replace(config, resolution=resolution)
