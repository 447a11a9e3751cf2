"""The offline DermPrompt back-end (mini and smoke profiles): attributes *measured* from the image and its
lesion mask, written in the same sentence structure as the VLM's (thesis §4.3.2), deterministically.

Size from the lesion area ratio; shape from circularity 4πS/P² (Crofton perimeter,
``ctrlgen.data.attributes``) and the axis ratio of the mask; lesion colour by naming the lesion's median
CIELAB colour; position from the mask centroid on a 3x3 grid; skin colour from the ITA of the clean skin
pixels (Fitzpatrick thresholds of §5.2); hair by a morphological black-hat on L*; marks: a dark
dermoscope frame (dark corners) and coloured ink (saturated blue/purple pixels).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from skimage.color import rgb2lab
from skimage.measure import label, regionprops
from skimage.morphology import black_tophat, dilation, disk

from ctrlgen.data.attributes import FST_TYPES, circularity, fitzpatrick_type, ita_from_lab
from ctrlgen.methods.didgen.dermprompt.captioner import DermPromptCaptioner
from ctrlgen.methods.didgen.dermprompt.prompt import Caption, DermAttributes
from ctrlgen.methods.didgen.dermprompt.vocabulary import PREFIX, SIZES, SKIN_COLOURS


@dataclass(frozen=True)
class CaptionerConfig:
    """Thresholds of the attribute captioner (chosen for this book; the thesis's VLM has none to copy)."""

    size_cuts: tuple[float, float] = (0.10, 0.25)     # area ratio: small < 0.10 ≤ medium < 0.25 ≤ large
    irregular_below: float = 0.70                     # circularity 4πS/P² below this: irregular
    oval_axis_ratio: float = 1.35                     # major/minor axis ratio from this: oval (if not irregular)
    centre_band: float = 0.15                         # |centroid − 0.5| ≤ this (fraction of the side): centre
    hair_radius_frac: float = 1 / 32                  # black-hat disk radius / image side (≥ 1 px)
    hair_response: float = 15.0                       # black-hat response in L* units that marks a hair pixel
    hair_fraction: float = 0.004                      # hair pixels / skin pixels above this: "with hair"
    frame_ratio: float = 0.6                          # corner L* below this × skin L*: dark frame
    ink_chroma: float = 20.0                          # chroma of an ink pixel (CIELAB)
    ink_hue: tuple[float, float] = (250.0, 335.0)     # hue angle range (degrees) of blue/purple ink
    ink_fraction: float = 0.003                       # ink pixels / non-lesion pixels above this: ink marks

    def as_dict(self) -> dict[str, Any]:
        """The thresholds as a dict (part of the captioner's fingerprint)."""
        return asdict(self)


def _lab(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    img = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    return rgb2lab(img)


def name_lesion_colour(lightness: float, a: float, b: float) -> str:
    """Colour name of a CIELAB colour (the lesion's median), from lightness, chroma and hue angle."""
    chroma = float(np.hypot(a, b))
    hue = float(np.degrees(np.arctan2(b, a)) % 360)
    if lightness < 22:
        return "black"
    if b < -2 and chroma > 6:
        return "blue-grey"
    if chroma < 8:
        return "white" if lightness > 75 else "grey"
    if hue < 40 or hue > 330:
        return "red" if lightness < 55 else "pink"
    if lightness < 42:
        return "dark brown"
    return "brown" if lightness < 60 else "light brown"


def skin_colour_name(ita: float) -> str:
    """Skin colour word of a Fitzpatrick type from ITA (thesis §5.2 thresholds)."""
    t = fitzpatrick_type(ita)[0]
    return SKIN_COLOURS[FST_TYPES.index(t)] if t else ""


def position_name(cy: float, cx: float, band: float = 0.15) -> str:
    """Position phrase of a centroid given as fractions of the image side (0 = top/left)."""
    row = "upper" if cy < 0.5 - band else ("lower" if cy > 0.5 + band else "")
    col = "left" if cx < 0.5 - band else ("right" if cx > 0.5 + band else "")
    if not row and not col:
        return "in the centre"
    if row and col:
        return f"in the {row} {col}"
    if row:
        return "at the top" if row == "upper" else "at the bottom"
    return f"on the {col}"


class AttributeCaptioner(DermPromptCaptioner):
    """Deterministic DermPrompt from measurements of the image and its mask (offline back-end)."""

    def __init__(self, tokenizer, prefix: str = PREFIX, config: CaptionerConfig = CaptionerConfig(),
                 max_tokens: int | None = None):
        super().__init__(tokenizer, prefix, max_tokens)
        self.config = config

    def fingerprint(self) -> str:
        """Hash of prefix, token limit, thresholds and tokenizer size (the cache key of its captions)."""
        blob = json.dumps({"kind": "attributes", "v": 1, "prefix": self.prefix, "max": self.max_tokens,
                           "config": self.config.as_dict(), "vocab": len(self.tokenizer)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    # -- measurements ---------------------------------------------------------------------------------
    def measure(self, image: np.ndarray, mask: np.ndarray) -> tuple[DermAttributes, dict[str, float]]:
        """The attributes and the numbers they come from (area ratio, circularity, ITA, ...)."""
        c = self.config
        mask = np.asarray(mask, bool)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
        if not mask.any():
            raise ValueError("empty lesion mask: DermPrompt describes a lesion")
        h, w = mask.shape
        lab = _lab(image)
        lightness = lab[..., 0]
        r = max(1, int(round(max(h, w) * c.hair_radius_frac)))
        hat = black_tophat(lightness, disk(r))
        near_lesion = dilation(mask, disk(r))
        skin = ~near_lesion
        # dark frame: the four corner patches much darker than the skin
        k = max(2, h // 16)
        corners = np.concatenate([lightness[:k, :k].ravel(), lightness[:k, -k:].ravel(),
                                  lightness[-k:, :k].ravel(), lightness[-k:, -k:].ravel()])
        skin_l = float(np.median(lightness[skin])) if skin.any() else float(np.median(lightness[~mask]))
        has_frame = float(np.mean(corners)) < c.frame_ratio * skin_l
        yy, xx = np.mgrid[0:h, 0:w]
        outer = np.hypot((yy + 0.5) / h - 0.5, (xx + 0.5) / w - 0.5) > 0.4  # where a dermoscope frame lies
        frame_px = (lightness < c.frame_ratio * skin_l) & outer
        hair_px = (hat > c.hair_response) & skin & ~frame_px
        hair_frac = float(hair_px.sum() / max(1, skin.sum()))
        chroma = np.hypot(lab[..., 1], lab[..., 2])
        hue = np.degrees(np.arctan2(lab[..., 2], lab[..., 1])) % 360
        ink_px = (chroma > c.ink_chroma) & (hue >= c.ink_hue[0]) & (hue <= c.ink_hue[1]) & ~mask
        ink_frac = float(ink_px.sum() / max(1, (~mask).sum()))
        clean_skin = skin & ~hair_px & ~frame_px & ~ink_px
        if not clean_skin.any():
            clean_skin = ~mask
        skin_ita = float(ita_from_lab(lightness[clean_skin].mean(), lab[..., 2][clean_skin].mean()))
        lesion_px = mask & ~(hat > c.hair_response)
        if lesion_px.sum() < max(4, 0.2 * mask.sum()):
            lesion_px = mask
        les = np.median(lab[lesion_px], axis=0)
        area = float(mask.mean())
        circ = float(circularity(mask)[0])
        props = max(regionprops(label(mask)), key=lambda p: p.area)
        minor = max(props.axis_minor_length, 1e-6)
        axis_ratio = float(props.axis_major_length / minor)
        ys, xs = np.nonzero(mask)
        cy, cx = (ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w
        size = SIZES[int(np.searchsorted(np.asarray(c.size_cuts), area, side="right"))]
        shape = "irregular" if circ < c.irregular_below else ("oval" if axis_ratio >= c.oval_axis_ratio else "round")
        marks = tuple(m for m, on in (("purple ink marks", ink_frac > c.ink_fraction), ("a dark frame", has_frame)) if on)
        attrs = DermAttributes(size=size, shape=shape, lesion_colour=name_lesion_colour(*les),
                               position=position_name(cy, cx, c.centre_band), skin_colour=skin_colour_name(skin_ita),
                               hair=hair_frac > c.hair_fraction, marks=marks)
        numbers = {"area_ratio": area, "circularity": circ, "axis_ratio": axis_ratio, "centroid_y": float(cy),
                   "centroid_x": float(cx), "skin_ita": skin_ita, "lesion_L": float(les[0]), "lesion_a": float(les[1]),
                   "lesion_b": float(les[2]), "hair_fraction": hair_frac, "ink_fraction": ink_frac,
                   "corner_L": float(np.mean(corners)), "skin_L": skin_l}
        return attrs, numbers

    def caption(self, image: np.ndarray, mask: np.ndarray) -> Caption:
        """The measured DermPrompt of one image, fitted to the token limit (``source="attributes"``)."""
        attrs, numbers = self.measure(np.asarray(image), np.asarray(mask, bool))
        text, kept, dropped, n = self._fit(attrs)
        return Caption(text, kept, n, dropped, "attributes", numbers)


__all__ = ["CaptionerConfig", "AttributeCaptioner", "name_lesion_colour", "skin_colour_name", "position_name"]
