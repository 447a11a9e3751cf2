"""Procedural multi-concept scenes for chapter 3 (AttenCraft): two or more objects from a vocabulary
(shape × colour × texture) on smooth backgrounds, with one exact mask per object and a caption.

``pretrain`` scenes use the base vocabulary minus the held-out (shape, colour, texture) triples; the
``customize`` sets mirror the 16 two-concept datasets of thesis §3.6.1: each is one image holding two
*novel instances of known classes* — held-out triples, so the shape word (the class name) is one the
base model was pretrained on, as "cat" is for Stable Diffusion, while that instance never occurred — and
a customization method must learn them from that single image. A class the base model never saw would
not do: its class name's cross-attention cannot localize, and AttenCraft's Stage I (§3.3.1) reads it.

The world is drawn so that a 64-pixel latent diffusion model with a 4× downsampling VAE (a 16×16
latent) can learn it (issue 12): backgrounds are smooth (a flat colour, a vertical gradient, sky over
grass — no per-pixel noise), the only texture besides ``plain`` is a wide diagonal stripe whose period
is ``STRIPE_PERIOD`` of the image side (9 px at 64 px, so two latent pixels or more per period), objects
fill most of their column, and background colours keep a distance from the objects' colours. Every
length is a fraction of the image side, so the full profile's 512-pixel scenes look the same.

Pretraining captions can name an object by its shape alone (``a photo of a circle and a red square ...``;
each object with ``bare_object_probability``), as web captions name a dog without its colour: chapter 3's
Stage I prompts a bare class word, which never follows "a" directly in complete captions. The book's
profiles keep it at 0: at 0.3 the mini scenes model learnt its words worse within the same steps (the
profile comment has the numbers). ``full_caption`` names every attribute: the labels chapter 2's
attribute classifier and bar read (``data.caption_labels``).

Layout written under ``<world>/multiconcept/``: ``pretrain/images/NNNNN.png``, ``pretrain/masks/NNNNN_K.png``,
``pretrain/captions.jsonl`` (one JSON object per image: file, caption, full_caption, objects) and
``customize/NN_a_and_b/{image.png, mask_0.png, mask_1.png, concepts.json}``.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrlgen.data.imageio import write_image, write_text
from ctrlgen.data.worlds.common import grid

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (235, 235, 235), "black": (25, 25, 25)}
TEXTURES = ("plain", "striped")
BACKGROUNDS = ("plain", "gradient", "field")
STRIPE_PERIOD = 1 / 7       # stripe period across the stripes, as a fraction of the image side
STRIPE_SHADE = 0.55         # the darker stripes are the object's colour × this (chapter 3's colour_share)
RADIUS = (0.7, 0.88)        # object radius range, as a fraction of half its column's width
SKY, GRASS = (150, 190, 235), (135, 225, 80)  # field colours, each ≥ 95 RGB units from every object shade
MIN_CONTRAST = 60.0         # RGB distance kept between a random background colour and every object shade


def held_out_combinations() -> set[tuple[str, str, str]]:
    """Base-vocabulary (shape, colour, texture) triples never used in pretraining (every 7th)."""
    combos = list(itertools.product(SHAPES, COLOURS, TEXTURES))
    return set(combos[::7])


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """The shape centred at (cy, cx) with radius ``r`` (normalised units); every shape fits in its radius."""
    y, x = (yy - cy) / r, (xx - cx) / r
    if shape == "circle":
        return x**2 + y**2 < 1
    if shape == "square":
        return (np.abs(x) < 0.8) & (np.abs(y) < 0.8)
    if shape == "triangle":
        return (y < 0.75) & (2 * np.abs(x) < y + 0.95)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) < 1
    if shape == "cross":  # arms 0.7 r wide: at least 4 px (one latent pixel) at 64 px
        return ((np.abs(x) < 0.35) & (np.abs(y) < 0.95)) | ((np.abs(y) < 0.35) & (np.abs(x) < 0.95))
    if shape == "ring":  # inner radius 0.5 r: the band is as wide as a cross arm
        d = x**2 + y**2
        return (d < 1) & (d > 0.25)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(texture: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Shade (H, W) in (0, 1]: 1 for ``plain``; diagonal bands of shade 1 and ``STRIPE_SHADE`` for ``striped``."""
    if texture == "plain":
        return np.ones_like(yy)
    if texture == "striped":  # (yy + xx) / √2 is the distance across the diagonal stripes
        phase = (yy + xx) / (np.sqrt(2) * STRIPE_PERIOD)
        return np.where(phase % 1.0 < 0.5, 1.0, STRIPE_SHADE).astype(yy.dtype)
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _object_shades(colours: list[str]) -> np.ndarray:
    """(2K, 3) RGB of every object's full and striped shade: what a background colour must stay away from."""
    rgb = np.array([COLOURS[c] for c in colours], np.float64)
    return np.concatenate([rgb, rgb * STRIPE_SHADE])


def _contrasting(rng: np.random.Generator, avoid: np.ndarray, tries: int = 32) -> np.ndarray:
    """A random RGB colour in [60, 220]³ at least ``MIN_CONTRAST`` from every row of ``avoid`` (else the
    farthest of ``tries`` draws), so that no object vanishes into its background."""
    best, best_d = None, -1.0
    for _ in range(tries):
        c = rng.uniform(60, 220, 3)
        d = float(np.linalg.norm(avoid - c, axis=1).min()) if len(avoid) else np.inf
        if d >= MIN_CONTRAST:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _background(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, avoid: np.ndarray) -> np.ndarray:
    """A smooth (H, W, 3) float32 background: flat, a vertical two-colour gradient, or sky over grass."""
    size = yy.shape
    if kind == "plain":
        return np.broadcast_to(_contrasting(rng, avoid), (*size, 3)).astype(np.float32)
    if kind == "gradient":
        top, bottom = _contrasting(rng, avoid), _contrasting(rng, avoid)
        return (top * (1 - yy[..., None]) + bottom * yy[..., None]).astype(np.float32)
    if kind == "field":  # sky above, grass below a gently wavy horizon (one edge, no fine detail)
        horizon = 0.6 + 0.04 * np.sin(2 * np.pi * (xx * rng.uniform(0.5, 1.5) + rng.uniform()))
        return np.where((yy > horizon)[..., None], np.float32(GRASS), np.float32(SKY)).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")


@dataclass(frozen=True)
class Concept:
    shape: str
    colour: str
    texture: str

    @property
    def phrase(self) -> str:
        return " ".join(w for w in (self.colour, "" if self.texture == "plain" else self.texture, self.shape) if w)


def scene_caption(concepts: list[Concept], background: str, bare: Sequence[bool] = ()) -> str:
    """``a photo of a red striped cross and a blue circle on a plain background`` (objects left to right);
    an object whose ``bare`` flag is set is named by its shape alone (``a cross``)."""
    bare = list(bare) or [False] * len(concepts)
    if len(bare) != len(concepts):
        raise ValueError(f"{len(bare)} bare flags for {len(concepts)} objects")
    phrases = [c.shape if b else c.phrase for c, b in zip(concepts, bare)]
    return "a photo of " + " and ".join(f"a {p}" for p in phrases) + f" on a {background} background"


def render_scene(concepts: list[Concept], size: int, rng: np.random.Generator, background: str
                 ) -> tuple[np.ndarray, list[np.ndarray], str]:
    """One scene: objects placed left to right, one per column, without overlap; returns image, masks and caption."""
    yy, xx = grid(size, size)
    image = _background(background, rng, yy, xx, _object_shades([c.colour for c in concepts])).copy()
    k = len(concepts)
    masks = []
    for i, c in enumerate(concepts):
        # radius ≤ 0.88 · 0.5/k and centre jitter ≤ 0.05/k keep neighbours apart (0.88/k < 0.9/k)
        r = rng.uniform(*RADIUS) * 0.5 / k
        cx = (i + 0.5) / k + rng.uniform(-0.05, 0.05) / k
        cy = rng.uniform(max(0.3, r + 0.03), min(0.7, 0.97 - r))
        mask = _shape_mask(c.shape, yy, xx, cy, cx, r)
        shade = _texture(c.texture, yy, xx)[..., None]
        image = np.where(mask[..., None], np.asarray(COLOURS[c.colour], np.float32) * shade, image)
        masks.append(mask)
    return np.clip(image, 0, 255).astype(np.uint8), masks, scene_caption(concepts, background)


def pretrain_concepts(rng: np.random.Generator, k: int) -> list[Concept]:
    held = held_out_combinations()
    chosen: list[Concept] = []
    while len(chosen) < k:
        c = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(TEXTURES)))
        if c not in held and all(c[0] != d.shape for d in chosen):
            chosen.append(Concept(*c))
    return chosen


def customization_concepts() -> list[Concept]:
    """The concepts a customization set can hold: every held-out base triple (``held_out_combinations``), a
    novel *instance* of a shape class the base model was pretrained on — as a user's own cat is for Stable
    Diffusion (thesis §3.3.1 reads the cross-attention of the class name, which only a known class localizes)."""
    return [Concept(*c) for c in sorted(held_out_combinations())]


def _distinct(a: Concept, b: Concept) -> bool:
    return a.shape != b.shape and a.colour != b.colour


def novel_pairs(count: int, seed: int) -> list[tuple[Concept, Concept]]:
    """``count`` distinct pairs of novel instances of known shapes (``customization_concepts``). The two concepts
    of a pair differ in shape and in colour: chapter 3 tells them apart by class name and measures feature fusion
    as the share of one concept's colour in the other's samples. Pairs are drawn in a seeded order that spreads
    the concepts evenly: each next pair is the first, in that order, whose concepts have been used least."""
    concepts = customization_concepts()
    rng = np.random.default_rng([seed, 21])
    candidates = [(a, b) for a, b in itertools.combinations(concepts, 2) if _distinct(a, b)]
    if not 0 <= count <= len(candidates):
        raise ValueError(f"n_customize={count}: the scenes world has {len(candidates)} pairs of held-out concepts "
                         f"that differ in shape and colour; expected 0 to {len(candidates)}")
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    flips = rng.integers(0, 2, len(order))   # which concept stands on the left
    uses = dict.fromkeys(concepts, 0)
    pairs: list[tuple[Concept, Concept]] = []
    for _ in range(count):
        k = min(range(len(order)), key=lambda i: (max(uses[order[i][0]], uses[order[i][1]]),
                                                  uses[order[i][0]] + uses[order[i][1]], i))
        a, b = order.pop(k)
        a, b = (b, a) if flips[len(pairs)] else (a, b)
        uses[a] += 1
        uses[b] += 1
        pairs.append((a, b))
    return pairs


def write_multiconcept(root: Path, n_pretrain: int, n_customize: int, size: int, seed: int,
                       bare_object_probability: float = 0.0) -> None:
    """Write the pretraining scenes and the customization sets (module doc) under ``root``; each object of a
    pretraining caption is named by its shape alone with ``bare_object_probability``."""
    if not 0.0 <= bare_object_probability <= 1.0:
        raise ValueError(f"bare_object_probability={bare_object_probability}: expected a probability in [0, 1]")
    rng = np.random.default_rng([seed, 20])
    # its own stream, so the images are the same whatever the probability
    caption_rng = np.random.default_rng([seed, 22])
    lines = []
    for i in range(n_pretrain):
        concepts = pretrain_concepts(rng, int(rng.choice([2, 2, 3])))
        background = str(rng.choice(BACKGROUNDS))
        image, masks, full_caption = render_scene(concepts, size, rng, background)
        caption = scene_caption(concepts, background, caption_rng.random(len(concepts)) < bare_object_probability)
        name = f"{i:05d}"
        write_image(root / "pretrain" / "images" / f"{name}.png", image)
        for k, mask in enumerate(masks):
            write_image(root / "pretrain" / "masks" / f"{name}_{k}.png", mask)
        lines.append(json.dumps({"file": f"images/{name}.png", "caption": caption, "full_caption": full_caption,
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
