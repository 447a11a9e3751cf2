"""Procedural multi-concept scenes for chapter 3 (AttenCraft): two or more objects from a vocabulary
(shape × colour × texture) on varied backgrounds, with one exact mask per object and a caption.

``pretrain`` scenes use the base vocabulary; the ``customize`` sets mirror the 16 two-concept
datasets of thesis §3.6.1: each is one image holding two *novel instances* — shapes outside the
base vocabulary, or base shapes in colour × texture combinations held out of pretraining — so a
customization method must learn them from that single image.

Layout written under ``<world>/multiconcept/``: ``pretrain/images/NNNNN.png``, ``pretrain/masks/NNNNN_K.png``,
``pretrain/captions.jsonl`` (one JSON object per image: file, caption, objects) and
``customize/NN_a_and_b/{image.png, mask_0.png, mask_1.png, concepts.json}``.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrlgen.data.imageio import write_image, write_text
from ctrlgen.data.worlds.common import grid, smooth_noise

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
NOVEL_SHAPES = ("star", "heart", "moon", "arrow")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (235, 235, 235), "black": (25, 25, 25)}
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ("plain", "gradient", "field", "noise")


def held_out_combinations() -> set[tuple[str, str, str]]:
    """Base-vocabulary (shape, colour, texture) triples never used in pretraining (every 7th)."""
    combos = list(itertools.product(SHAPES, COLOURS, TEXTURES))
    return set(combos[::7])


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = (yy - cy) / r, (xx - cx) / r
    if shape == "circle":
        return x**2 + y**2 < 1
    if shape == "square":
        return (np.abs(x) < 0.8) & (np.abs(y) < 0.8)
    if shape == "triangle":
        return (y < 0.75) & (2 * np.abs(x) < y + 0.95)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) < 1
    if shape == "cross":
        return ((np.abs(x) < 0.3) & (np.abs(y) < 0.95)) | ((np.abs(y) < 0.3) & (np.abs(x) < 0.95))
    if shape == "ring":
        d = x**2 + y**2
        return (d < 1) & (d > 0.35)
    if shape == "star":
        ang, rad = np.arctan2(y, x), np.sqrt(x**2 + y**2)
        return rad < 0.55 + 0.4 * np.cos(5 * ang) ** 2
    if shape == "heart":
        x2, y2 = x * 1.1, -y * 1.1 + 0.2
        return (x2**2 + y2**2 - 0.8) ** 3 - x2**2 * y2**3 < 0
    if shape == "moon":
        return (x**2 + y**2 < 1) & ((x - 0.45) ** 2 + (y + 0.1) ** 2 > 0.6)
    if shape == "arrow":
        return ((np.abs(y) < 0.25) & (x > -0.9) & (x < 0.2)) | ((x >= 0.2) & (x < 0.95) & (np.abs(y) < 0.95 - x))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    period = 6.0 / size
    if texture == "plain":
        return np.ones_like(yy)
    if texture == "striped":
        return 0.55 + 0.45 * (np.sin(2 * np.pi * (yy + xx) / period) > 0)
    if texture == "dotted":
        return 1.0 - 0.5 * ((np.sin(np.pi * yy / period) ** 2 * np.sin(np.pi * xx / period) ** 2) > 0.6)
    if texture == "checkered":
        return 0.55 + 0.45 * ((np.floor(yy / period) + np.floor(xx / period)) % 2)
    raise ValueError(f"unknown texture {texture!r}")


def _background(kind: str, rng: np.random.Generator, size: int, yy, xx) -> np.ndarray:
    base = rng.uniform(60, 220, 3)
    if kind == "plain":
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == "gradient":
        other = rng.uniform(60, 220, 3)
        return (base * (1 - yy[..., None]) + other * yy[..., None]).astype(np.float32)
    if kind == "field":  # sky above, grass below a wavy horizon
        horizon = 0.55 + 0.05 * np.sin(2 * np.pi * xx * rng.uniform(1, 3))
        sky, grass = np.array([150, 190, 235]), np.array([70, 140, 60])
        return np.where((yy > horizon)[..., None], grass, sky).astype(np.float32)
    noise = smooth_noise(rng, 1, size, size, 5)[0][..., None]
    return np.clip(base + 40 * noise, 0, 255).astype(np.float32)


@dataclass(frozen=True)
class Concept:
    shape: str
    colour: str
    texture: str

    @property
    def phrase(self) -> str:
        return " ".join(w for w in (self.colour, "" if self.texture == "plain" else self.texture, self.shape) if w)


def render_scene(concepts: list[Concept], size: int, rng: np.random.Generator, background: str
                 ) -> tuple[np.ndarray, list[np.ndarray], str]:
    """One scene: objects placed left to right without overlap; returns image, masks and caption."""
    yy, xx = grid(size, size)
    image = _background(background, rng, size, yy, xx).copy()
    k = len(concepts)
    masks = []
    for i, c in enumerate(concepts):
        r = rng.uniform(0.55, 0.8) * 0.5 / k
        cx = (i + 0.5) / k + rng.uniform(-0.05, 0.05) / k
        cy = rng.uniform(0.3 + r * 0.8, 0.7 - r * 0.8) if r < 0.2 else 0.5
        mask = _shape_mask(c.shape, yy, xx, cy, cx, r)
        shade = _texture(c.texture, yy, xx, size)[..., None]
        image = np.where(mask[..., None], np.asarray(COLOURS[c.colour], np.float32) * shade, image)
        masks.append(mask)
    caption = "a photo of " + " and ".join(f"a {c.phrase}" for c in concepts) + f" on a {background} background"
    return np.clip(image, 0, 255).astype(np.uint8), masks, caption


def pretrain_concepts(rng: np.random.Generator, k: int) -> list[Concept]:
    held = held_out_combinations()
    chosen: list[Concept] = []
    while len(chosen) < k:
        c = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(TEXTURES)))
        if c not in held and all(c[0] != d.shape for d in chosen):
            chosen.append(Concept(*c))
    return chosen


def novel_pairs(count: int, seed: int) -> list[tuple[Concept, Concept]]:
    """``count`` pairs of novel instances (novel shapes, or held-out base combinations)."""
    rng = np.random.default_rng([seed, 21])
    held = sorted(held_out_combinations())
    novel = [Concept(s, str(rng.choice(list(COLOURS))), str(rng.choice(TEXTURES))) for s in NOVEL_SHAPES]
    pool = novel + [Concept(*held[i]) for i in rng.permutation(len(held))[:12]]
    pairs = []
    for i in range(count):
        a, b = pool[i % len(pool)], pool[(i * 5 + 3) % len(pool)]
        if a.shape == b.shape:
            b = pool[(i * 5 + 4) % len(pool)]
        pairs.append((a, b))
    return pairs


def write_multiconcept(root: Path, n_pretrain: int, n_customize: int, size: int, seed: int) -> None:
    """Write the pretraining scenes and the customization sets (module doc) under ``root``."""
    rng = np.random.default_rng([seed, 20])
    lines = []
    for i in range(n_pretrain):
        concepts = pretrain_concepts(rng, int(rng.choice([2, 2, 3])))
        image, masks, caption = render_scene(concepts, size, rng, str(rng.choice(BACKGROUNDS)))
        name = f"{i:05d}"
        write_image(root / "pretrain" / "images" / f"{name}.png", image)
        for k, mask in enumerate(masks):
            write_image(root / "pretrain" / "masks" / f"{name}_{k}.png", mask)
        lines.append(json.dumps({"file": f"images/{name}.png", "caption": caption,
                                 "objects": [c.__dict__ for c in concepts]}))
    write_text(root / "pretrain" / "captions.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    for i, (a, b) in enumerate(novel_pairs(n_customize, seed)):
        image, masks, caption = render_scene([a, b], size, rng, str(rng.choice(BACKGROUNDS)))
        folder = root / "customize" / f"{i + 1:02d}_{a.shape}_and_{b.shape}"
        write_image(folder / "image.png", image)
        for k, mask in enumerate(masks):
            write_image(folder / f"mask_{k}.png", mask)
        write_text(folder / "concepts.json", json.dumps({"caption": caption, "class_names": [a.shape, b.shape],
                                                         "concepts": [a.__dict__, b.__dict__]}, indent=1))
