"""DermPrompt (thesis §4.3.2): attribute-rich prompts for dermoscopic images.

The thesis asks a vision-language model (Llama-3.2 Vision) for the lesion's shape, colour, size and
position and the skin's colour, hair and artificial marks, then has it rephrase them into one
structured sentence under CLIP's 77-token limit; the training prompt is
``"An image of <lesion> on <skin>"`` followed by that sentence (§4.3.3).

One interface, ``DermPromptCaptioner``, two back-ends:

* ``AttributeCaptioner`` (offline, mini and smoke profiles): *measures* the same attributes from the
  image and its lesion mask and writes the same sentence structure, deterministically —
  size from the lesion area ratio; shape from circularity 4πS/P² (Crofton perimeter,
  ``ctrlgen.data.attributes``) and the axis ratio of the mask; lesion colour by naming the lesion's
  median CIELAB colour; position from the mask centroid on a 3x3 grid; skin colour from the ITA of
  the clean skin pixels (Fitzpatrick thresholds of §5.2); hair by a morphological black-hat on L*;
  marks: a dark dermoscope frame (dark corners) and coloured ink (saturated blue/purple pixels).
* ``VLMCaptioner`` (full profile): a chat VLM from a local folder (transformers ``AutoProcessor`` +
  ``AutoModelForImageTextToText``; Llama-3.2-11B-Vision-Instruct by default, any chat VLM accepted),
  first an attribute-extraction prompt answered in JSON, then a rephrasing prompt.

Sentence structure (both back-ends)::

    An image of <lesion> on <skin>, a small round dark brown lesion in the centre on light skin with hair and a dark frame

Token limit: every prompt is counted with the *real* tokenizer of the model it will condition
(start and end tokens included) against ``tokenizer.model_max_length`` (77 for SD, the profile's
``max_length`` for the mini models). Nothing is ever truncated silently: attributes are dropped in
the order ``DROP_ORDER`` (marks, hair, position, shape, size; lesion and skin colour never) and the
dropped ones are recorded in ``Caption.dropped``; if the prompt is still too long,
``PromptTooLongError`` is raised.

New inference prompts (§4.3.2: the thesis asks the LLM for new prompts built from existing ones):
``PromptSampler`` recombines attribute values observed in training captions (each value seen in
training; combinations new or, with ``mode="joint"``, only observed ones).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

PREFIX = "An image of <lesion> on <skin>"
SIZES = ("small", "medium", "large")
SHAPES = ("round", "oval", "irregular")
LESION_COLOURS = ("black", "dark brown", "brown", "light brown", "red", "pink", "blue-grey", "grey", "white")
SKIN_COLOURS = ("very light", "light", "intermediate", "tan", "brown", "dark")  # Fitzpatrick I..VI (ITA, §5.2)
POSITIONS = ("in the centre", "at the top", "at the bottom", "on the left", "on the right", "in the upper left",
             "in the upper right", "in the lower left", "in the lower right")
MARKS = ("a dark frame", "purple ink marks")
# attributes removed, in this order, when a prompt does not fit the text encoder (colours are never removed)
DROP_ORDER = ("marks", "hair", "position", "shape", "size")


class PromptTooLongError(ValueError):
    """A prompt that does not fit the text encoder even with every droppable attribute removed."""


class CaptionError(RuntimeError):
    """A caption could not be produced (e.g. a VLM answer that cannot be parsed)."""


@dataclass(frozen=True)
class DermAttributes:
    """The DermPrompt attributes of one image (words from the vocabularies above, or VLM free text)."""

    size: str = ""
    shape: str = ""
    lesion_colour: str = ""
    position: str = ""
    skin_colour: str = ""
    hair: bool = False
    marks: tuple[str, ...] = ()

    def without(self, names: Iterable[str]) -> "DermAttributes":
        blank = {"hair": False, "marks": ()}
        return replace(self, **{n: blank.get(n, "") for n in names})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["marks"] = list(self.marks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DermAttributes":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["marks"] = tuple(kw.get("marks", ()))
        kw["hair"] = bool(kw.get("hair", False))
        return cls(**kw)


def sentence(attrs: DermAttributes) -> str:
    """The structured DermPrompt sentence (without the prefix) from attributes; empty attributes are left out."""
    words = [w for w in (attrs.size, attrs.shape, attrs.lesion_colour) if w]
    head = " ".join(words + ["lesion"])
    article = "an" if head[0] in "aeiou" else "a"
    text = f"{article} {head}"
    if attrs.position:
        text += f" {attrs.position}"
    if attrs.skin_colour:
        text += f" on {attrs.skin_colour} skin"
    extras = (["hair"] if attrs.hair else []) + list(attrs.marks)
    if extras:
        text += " with " + " and ".join(extras)
    return text


def compose_prompt(attrs: DermAttributes | None, prefix: str = PREFIX) -> str:
    """``prefix`` + ", " + the DermPrompt sentence (``attrs=None``: the prefix alone, the "Mine-prefix" row)."""
    return prefix if attrs is None else f"{prefix}, {sentence(attrs)}"


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` with the model's own tokenizer, start and end tokens included, untruncated."""
    return len(tokenizer(text, truncation=False)["input_ids"])


def fit_prompt(attrs: DermAttributes, tokenizer, prefix: str = PREFIX, max_tokens: int | None = None
               ) -> tuple[str, DermAttributes, tuple[str, ...], int]:
    """Compose a prompt that fits ``max_tokens`` (default ``tokenizer.model_max_length``).

    Drops attributes in ``DROP_ORDER`` until it fits; returns (prompt, attributes kept, dropped, tokens).
    Raises ``PromptTooLongError`` when even the colours alone do not fit.
    """
    limit = int(max_tokens or tokenizer.model_max_length)
    dropped: list[str] = []
    current = attrs
    while True:
        text = compose_prompt(current, prefix)
        n = count_tokens(tokenizer, text)
        if n <= limit:
            return text, current, tuple(dropped), n
        left = [d for d in DROP_ORDER if d not in dropped and getattr(current, d)]
        if not left:
            raise PromptTooLongError(f"prompt of {n} tokens exceeds the text encoder's {limit} even without "
                                     f"{', '.join(dropped) or 'any droppable attribute'}: {text!r}")
        dropped.append(left[0])
        current = current.without([left[0]])


def dermprompt_vocabulary(prefix: str = PREFIX) -> list[str]:
    """Every phrase the attribute captioner can write, as sentences: give them to
    ``build_caption_tokenizer`` (corpora or ``extra_words``) so that each word is one token of a mini tokenizer."""
    out = [prefix, "a an lesion on skin with and"]
    out += list(SIZES) + list(SHAPES) + list(LESION_COLOURS) + list(POSITIONS) + list(MARKS)
    out += [f"{c} skin" for c in SKIN_COLOURS] + ["hair"]
    return out


@dataclass(frozen=True)
class Caption:
    """One DermPrompt: the full prompt, its attributes, token count and what was dropped to fit."""

    text: str
    attributes: DermAttributes
    n_tokens: int
    dropped: tuple[str, ...] = ()
    # attributes | vlm | vlm-template (VLM attributes, sentence from the template) | attributes-fallback
    # (the VLM's answer could not be parsed and the captioner has an attribute fallback)
    source: str = "attributes"
    measurements: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "attributes": self.attributes.to_dict(), "n_tokens": self.n_tokens,
                "dropped": list(self.dropped), "source": self.source, "measurements": self.measurements}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Caption":
        return cls(d["text"], DermAttributes.from_dict(d["attributes"]), int(d["n_tokens"]), tuple(d["dropped"]),
                   d["source"], dict(d.get("measurements", {})))


# ================================================================================================ cache
class CaptionCache:
    """One JSON file per image under ``folder/<captioner fingerprint>/<image id>.json``, written atomically."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, fingerprint: str, image_id: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", image_id)
        return self.folder / fingerprint / f"{safe}.json"

    def get(self, fingerprint: str, image_id: str) -> Caption | None:
        p = self._path(fingerprint, image_id)
        if not p.is_file():
            return None
        try:
            return Caption.from_json(json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, KeyError):
            return None  # a damaged entry is recomputed

    def put(self, fingerprint: str, image_id: str, caption: Caption) -> Path:
        p = self._path(fingerprint, image_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(caption.to_json(), fh, indent=1)
        os.replace(tmp, p)
        return p


# ================================================================================================ interface
class DermPromptCaptioner(ABC):
    """Shared interface: ``caption(image, mask)`` → ``Caption``; ``caption_many`` with a per-image cache.

    ``tokenizer`` is the tokenizer of the text encoder the prompts will condition (the 77-token check).
    """

    def __init__(self, tokenizer, prefix: str = PREFIX, max_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.max_tokens = int(max_tokens or tokenizer.model_max_length)

    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash of everything that determines the captions (cache key)."""

    @abstractmethod
    def caption(self, image: np.ndarray, mask: np.ndarray) -> Caption:
        """The DermPrompt of one image ``(H, W, 3)`` uint8 with its lesion mask ``(H, W)`` bool."""

    def caption_many(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], ids: Sequence[str] | None = None,
                     cache: CaptionCache | None = None) -> list[Caption]:
        """Captions of a dataset; with ``cache`` and ``ids`` each image is captioned once per fingerprint."""
        if ids is not None and len(ids) != len(images):
            raise ValueError("give one id per image")
        fp = self.fingerprint()
        out = []
        for i, (img, msk) in enumerate(zip(images, masks)):
            key = None if ids is None else str(ids[i])
            hit = cache.get(fp, key) if (cache is not None and key is not None) else None
            if hit is None:
                hit = self.caption(np.asarray(img), np.asarray(msk, bool))
                if cache is not None and key is not None:
                    cache.put(fp, key, hit)
            out.append(hit)
        return out

    def _fit(self, attrs: DermAttributes) -> tuple[str, DermAttributes, tuple[str, ...], int]:
        return fit_prompt(attrs, self.tokenizer, self.prefix, self.max_tokens)


# ================================================================================================ offline back-end
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
        return asdict(self)


def _lab(image: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

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
    from ctrlgen.data.attributes import FST_TYPES, fitzpatrick_type

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
        blob = json.dumps({"kind": "attributes", "v": 1, "prefix": self.prefix, "max": self.max_tokens,
                           "config": self.config.as_dict(), "vocab": len(self.tokenizer)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    # -- measurements ---------------------------------------------------------------------------------
    def measure(self, image: np.ndarray, mask: np.ndarray) -> tuple[DermAttributes, dict[str, float]]:
        """The attributes and the numbers they come from (area ratio, circularity, ITA, ...)."""
        from skimage.measure import label, regionprops
        from skimage.morphology import black_tophat, dilation, disk

        from ctrlgen.data.attributes import circularity, ita_from_lab

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
        attrs, numbers = self.measure(np.asarray(image), np.asarray(mask, bool))
        text, kept, dropped, n = self._fit(attrs)
        return Caption(text, kept, n, dropped, "attributes", numbers)


# ================================================================================================ VLM back-end
EXTRACTION_PROMPT = (
    "You are a dermatologist looking at a dermoscopic image of a skin lesion. Describe it by filling in this "
    "JSON object with short phrases: {\"lesion_shape\": \"...\", \"lesion_colour\": \"...\", "
    "\"lesion_size\": \"small, medium or large\", \"lesion_position\": \"...\", \"skin_colour\": \"...\", "
    "\"hair\": \"yes or no\", \"marks\": \"none, or the artificial marks you see (ruler, ink, dark frame, ...)\"}. "
    "Answer with the JSON object only."
)
REPHRASE_PROMPT = (
    "Rewrite these attributes of a dermoscopic image as one concise sentence of at most {max_words} words with "
    "this structure: \"a <size> <shape> <colour> lesion <position> on <skin colour> skin with <hair and marks>\". "
    "Attributes: {attributes}. Answer with the sentence only."
)
GenerateFn = Callable[[list[dict[str, Any]], Any], str]


def _text_message(text: str, with_image: bool) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def parse_attribute_answer(answer: str) -> DermAttributes:
    """``DermAttributes`` from the VLM's JSON answer (the first ``{...}`` in it); ``CaptionError`` if none parses."""
    match = re.search(r"\{.*\}", answer, flags=re.S)
    if match is None:
        raise CaptionError(f"no JSON object in the VLM answer: {answer[:200]!r}")
    try:
        d = json.loads(match.group(0))
    except json.JSONDecodeError as err:
        raise CaptionError(f"VLM answer is not valid JSON ({err}): {match.group(0)[:200]!r}") from None
    get = lambda k: str(d.get(k, "") or "").strip().lower().rstrip(".")  # noqa: E731
    hair = get("hair") in ("yes", "true", "present", "y")
    marks_text = get("marks")
    marks = () if marks_text in ("", "none", "no", "n/a") else tuple(m.strip() for m in re.split(r",| and ", marks_text) if m.strip())
    position = get("lesion_position")
    if position and not position.startswith(("in ", "at ", "on ")):
        position = f"in the {position}" if not position.startswith("the ") else f"in {position}"
    skin = get("skin_colour").removesuffix(" skin")
    return DermAttributes(size=get("lesion_size"), shape=get("lesion_shape"), lesion_colour=get("lesion_colour"),
                          position=position, skin_colour=skin, hair=hair, marks=marks)


def clean_sentence(answer: str) -> str:
    """The first line of the rephrasing answer, without quotes, prefix or final full stop."""
    line = next((l for l in answer.strip().splitlines() if l.strip()), "").strip().strip("\"'").strip()
    line = re.sub(r"^(an image of <lesion> on <skin>[,.]?\s*)", "", line, flags=re.I)
    return line.rstrip(".").strip()


class HFChatVLM:
    """``generate_fn`` backed by a transformers chat VLM in a local folder (never downloads).

    Loads ``AutoProcessor`` and ``AutoModelForImageTextToText`` with ``local_files_only=True``;
    greedy decoding; returns the newly generated text (the prompt tokens are cut off, special tokens
    skipped). The chat template is rendered to text and then tokenised by the processor together with
    the image; when the rendered prompt already starts with the BOS token (Llama 3.x templates do), the
    tokeniser must not add a second one (``add_special_tokens=False``, as in the Llama-3.2-Vision model
    card and transformers' own ``apply_chat_template(tokenize=True)``). Floating-point inputs (pixel
    values) are cast to the model's dtype.
    """

    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 160):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        p = Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"no VLM at {p}: put a transformers chat VLM folder there "
                                    "(e.g. meta-llama/Llama-3.2-11B-Vision-Instruct: config.json, processor and weights)")
        self.processor = AutoProcessor.from_pretrained(str(p), local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(
            str(p), local_files_only=True, dtype=getattr(torch, dtype)).to(device).eval()
        self.max_new_tokens = max_new_tokens
        self.name = p.name

    def __call__(self, messages: list[dict[str, Any]], image: Any) -> str:
        import torch

        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        kw: dict[str, Any] = {"images": image} if image is not None else {}
        bos = getattr(getattr(self.processor, "tokenizer", self.processor), "bos_token", None)
        if bos and text.startswith(bos):  # the template wrote BOS: do not let the tokeniser add another
            kw["add_special_tokens"] = False
        inputs = self.processor(text=text, return_tensors="pt", **kw).to(self.model.device, dtype=self.model.dtype)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new, skip_special_tokens=True)


class VLMCaptioner(DermPromptCaptioner):
    """DermPrompt from a chat VLM: attribute extraction (JSON), then rephrasing into one sentence (§4.3.2).

    ``generate_fn(messages, image) -> str`` answers one chat turn; by default an ``HFChatVLM`` on
    ``model_path``. If the rephrased sentence does not fit the token limit, the prompt is composed
    from the extracted attributes with the template instead (``source="vlm-template"``), dropping
    attributes as ``fit_prompt`` does; both are recorded in the ``Caption``.
    """

    def __init__(self, tokenizer, model_path: str | Path = "", generate_fn: GenerateFn | None = None,
                 prefix: str = PREFIX, max_tokens: int | None = None, max_words: int = 40, model_name: str = "",
                 fallback: DermPromptCaptioner | None = None):
        super().__init__(tokenizer, prefix, max_tokens)
        if generate_fn is None:
            if not model_path:
                raise ValueError("VLMCaptioner needs model_path (a local VLM folder) or generate_fn")
            generate_fn = HFChatVLM(model_path)
        self.generate_fn = generate_fn
        self.max_words = max_words
        self.model_name = model_name or str(model_path) or getattr(generate_fn, "name", "custom")
        self.fallback = fallback  # captions an image whose VLM answer cannot be parsed (else CaptionError)

    def fingerprint(self) -> str:
        blob = json.dumps({"kind": "vlm", "v": 1, "model": self.model_name, "prefix": self.prefix, "max": self.max_tokens,
                           "extract": EXTRACTION_PROMPT, "rephrase": REPHRASE_PROMPT, "words": self.max_words,
                           "fallback": self.fallback.fingerprint() if self.fallback is not None else None})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def extract(self, image: np.ndarray) -> DermAttributes:
        from PIL import Image

        answer = self.generate_fn(_text_message(EXTRACTION_PROMPT, True), Image.fromarray(np.asarray(image)))
        return parse_attribute_answer(answer)

    def rephrase(self, attrs: DermAttributes) -> str:
        prompt = REPHRASE_PROMPT.format(max_words=self.max_words, attributes=json.dumps(attrs.to_dict()))
        return clean_sentence(self.generate_fn(_text_message(prompt, False), None))

    def caption(self, image: np.ndarray, mask: np.ndarray | None = None) -> Caption:
        try:
            attrs = self.extract(image)
        except CaptionError:
            if self.fallback is None:
                raise
            return replace(self.fallback.caption(image, mask), source="attributes-fallback")  # counted by source
        line = self.rephrase(attrs)
        if line:
            text = f"{self.prefix}, {line}"
            n = count_tokens(self.tokenizer, text)
            if n <= self.max_tokens:
                return Caption(text, attrs, n, (), "vlm")
        text, kept, dropped, n = self._fit(attrs)
        return Caption(text, kept, n, dropped, "vlm-template")


def captioner_from_profile(cfg, tokenizer, generate_fn: GenerateFn | None = None) -> DermPromptCaptioner:
    """The profile's DermPrompt captioner (``didgen.dermprompt.captioner``): ``attributes`` (offline, measured
    from image and mask) or ``vlm`` — ``HFChatVLM`` on ``vlm_model`` (a local folder, or a hub id resolved
    under ``models.root``) on the profile's device in ``vlm_dtype``, with the attribute captioner as the
    counted fallback for answers that cannot be parsed. ``generate_fn`` replaces the VLM (tests, remote
    services)."""
    from ctrlgen.config import ConfigError
    from ctrlgen.models.registry import local_folder
    from ctrlgen.runtime import resolve_device

    d, prefix = cfg["didgen"]["dermprompt"], str(cfg["didgen"]["prefix"])
    kind = str(d["captioner"])
    attributes = AttributeCaptioner(tokenizer, prefix=prefix)
    if kind == "attributes":
        return attributes
    if kind != "vlm":
        raise ConfigError(f"didgen.dermprompt.captioner must be 'attributes' or 'vlm', got {kind!r}")
    source = str(d["vlm_model"])
    if generate_fn is None:
        if not source:
            raise ConfigError("didgen.dermprompt.captioner is 'vlm' but didgen.dermprompt.vlm_model is empty: "
                              "give a local chat-VLM folder (e.g. Llama-3.2-11B-Vision-Instruct)")
        generate_fn = HFChatVLM(local_folder(cfg, source), device=resolve_device(cfg), dtype=str(d["vlm_dtype"]),
                                max_new_tokens=int(d["vlm_max_new_tokens"]))
    return VLMCaptioner(tokenizer, generate_fn=generate_fn, prefix=prefix, max_words=int(d["max_words"]),
                        model_name=source or getattr(generate_fn, "name", "custom"), fallback=attributes)


# ================================================================================================ recombination
class PromptSampler:
    """New inference prompts from attribute values seen in training captions (§4.3.2, offline path).

    ``mode="marginal"``: each attribute drawn from its empirical distribution over the training
    captions, independently (every value was seen, the combination may be new); ``"joint"``: whole
    observed attribute tuples. ``fix`` pins attributes (e.g. ``{"skin_colour": "dark"}`` for the
    §4.4.6 customisation grid). Prompts are fitted to the token limit like training prompts.
    """

    def __init__(self, captions: Sequence[Caption], tokenizer, prefix: str = PREFIX, max_tokens: int | None = None):
        if not captions:
            raise ValueError("PromptSampler needs the training captions")
        self.attributes = [c.attributes for c in captions]
        self.tokenizer, self.prefix, self.max_tokens = tokenizer, prefix, max_tokens

    def observed(self, name: str) -> list[Any]:
        """The distinct values of one attribute in the training captions, most frequent first."""
        from collections import Counter

        counts = Counter(getattr(a, name) for a in self.attributes)
        return [v for v, _ in counts.most_common()]

    def sample(self, n: int, seed: int = 0, mode: str = "marginal", fix: dict[str, Any] | None = None) -> list[Caption]:
        rng = np.random.default_rng(seed)
        out = []
        names = [f.name for f in fields(DermAttributes)]
        for _ in range(n):
            if mode == "joint":
                attrs = self.attributes[int(rng.integers(len(self.attributes)))]
            elif mode == "marginal":
                attrs = DermAttributes(**{k: getattr(self.attributes[int(rng.integers(len(self.attributes)))], k)
                                          for k in names})
            else:
                raise ValueError("mode must be 'marginal' or 'joint'")
            if fix:
                attrs = replace(attrs, **fix)
            text, kept, dropped, k = fit_prompt(attrs, self.tokenizer, self.prefix, self.max_tokens)
            out.append(Caption(text, kept, k, dropped, f"sampled-{mode}"))
        return out


__all__ = [
    "PREFIX", "SIZES", "SHAPES", "LESION_COLOURS", "SKIN_COLOURS", "POSITIONS", "MARKS", "DROP_ORDER",
    "PromptTooLongError", "CaptionError", "DermAttributes", "Caption", "CaptionCache", "DermPromptCaptioner",
    "CaptionerConfig", "AttributeCaptioner", "VLMCaptioner", "HFChatVLM", "PromptSampler", "sentence",
    "captioner_from_profile",
    "compose_prompt", "count_tokens", "fit_prompt", "dermprompt_vocabulary", "name_lesion_colour",
    "skin_colour_name", "position_name", "parse_attribute_answer", "clean_sentence",
]
