"""Ground-truth attributes read back from the base models' captions (issue 12's quality bar, criterion 2).

A caption is what a base model is prompted with, so the attributes it states are the ground truth a sample
generated from it should show. Per domain (caption formats of ``ctrlgen.data.domains`` and
``ctrlgen.data.worlds.multiconcept``):

* ``derm`` — ``an image of a {small|medium|large} {dark|faint} <lesion> on <skin>``:
  ``size`` (3 classes: mask-area tertile) and ``contrast`` (2 classes: ITA-difference contrast class).
* ``scenes`` — ``a photo of a red square and a blue striped circle on a plain background`` (2–3 objects,
  ``colour [texture] shape``; the texture word is left out for plain objects): ``objects`` (number of
  objects, a class), ``shapes`` and ``colours`` (the sets present, multi-hot).
* ``cxr`` — ``a chest x-ray with cardiomegaly and pleural effusion`` / ``a chest x-ray with no finding``:
  ``findings`` (multi-hot over the findings that occur).

A parser returns ``{attribute: value}`` with a ``str`` for a class attribute and a ``frozenset[str]`` for a
multi-hot one; a caption it cannot read raises ``ValueError`` quoting the caption. An ``AttributeSchema``
fixes the classes and label vocabularies (from a domain's vocabulary, restricted to the values that occur in
the captions it is built from) and encodes captions as arrays: class attributes as ``int64`` indices ``(N,)``,
multi-hot attributes as ``float32`` 0/1 matrices ``(N, K)``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ctrlgen.data.domains import CXR_PROMPT, DERM_TOKENS, DOMAINS
from ctrlgen.data.readers.cxr import CHEXPERT_LABELS, NIH_LABELS
from ctrlgen.data.worlds.multiconcept import BACKGROUNDS, COLOURS, SHAPES, TEXTURES, Concept

CLASS, MULTI = "class", "multi-hot"
DERM_SIZES = ("small", "medium", "large")
DERM_CONTRASTS = ("dark", "faint")
NO_FINDING = "no finding"
# Every finding name a caption can hold, as ``cxr_caption`` writes it (lower case, "_" -> " "), NIH order first.
CXR_FINDINGS = tuple(dict.fromkeys(n.lower().replace("_", " ") for n in (*NIH_LABELS, *CHEXPERT_LABELS)
                                   if n.lower() != NO_FINDING))
SCENE_SHAPES = SHAPES
SCENE_COLOURS = tuple(COLOURS)

_DERM = re.compile(rf"an image of a (\w+) (\w+) {re.escape(DERM_TOKENS[0])} on {re.escape(DERM_TOKENS[1])}")
_SCENE = re.compile(r"a photo of (.+) on a (\w+) background")
_CXR = re.compile(re.escape(CXR_PROMPT).replace(r"\{\}", "(.+)"))


def _unreadable(domain: str, caption: str, why: str) -> ValueError:
    return ValueError(f"cannot read the {domain} caption {caption!r}: {why}")


def _check_text(domain: str, caption: object) -> str:
    if not isinstance(caption, str):
        raise ValueError(f"a {domain} caption must be a str, got {type(caption).__name__} {caption!r}")
    return caption.strip()


def parse_derm_caption(caption: str) -> dict[str, str]:
    """``an image of a large faint <lesion> on <skin>`` -> ``{"size": "large", "contrast": "faint"}``."""
    text = _check_text("derm", caption)
    m = _DERM.fullmatch(text)
    if m is None:
        raise _unreadable("derm", caption, f"expected 'an image of a {{{'|'.join(DERM_SIZES)}}} "
                                           f"{{{'|'.join(DERM_CONTRASTS)}}} {DERM_TOKENS[0]} on {DERM_TOKENS[1]}'")
    size, contrast = m.groups()
    if size not in DERM_SIZES:
        raise _unreadable("derm", caption, f"size {size!r} is not one of {DERM_SIZES}")
    if contrast not in DERM_CONTRASTS:
        raise _unreadable("derm", caption, f"contrast {contrast!r} is not one of {DERM_CONTRASTS}")
    return {"size": size, "contrast": contrast}


def _scene_object(caption: str, phrase: str) -> Concept:
    """``a red striped cross`` -> its ``Concept``; the texture word is optional (absent for plain objects)."""
    words = phrase.split()
    if len(words) not in (3, 4) or words[0] not in ("a", "an"):
        raise _unreadable("scenes", caption, f"object {phrase!r} is not 'a <colour> [<texture>] <shape>'")
    colour, shape, texture = words[1], words[-1], words[2] if len(words) == 4 else "plain"
    if colour not in SCENE_COLOURS:
        raise _unreadable("scenes", caption, f"colour {colour!r} of {phrase!r} is not one of {SCENE_COLOURS}")
    if shape not in SCENE_SHAPES:
        raise _unreadable("scenes", caption, f"shape {shape!r} of {phrase!r} is not one of {SCENE_SHAPES}")
    # "plain" is never written out (Concept.phrase), so a four-word phrase must name another texture
    if texture not in TEXTURES or (len(words) == 4 and texture == "plain"):
        raise _unreadable("scenes", caption, f"texture {texture!r} of {phrase!r} is not one of {TEXTURES[1:]}")
    return Concept(shape, colour, texture)


def scene_objects(caption: str) -> tuple[list[Concept], str]:
    """The objects of a complete scenes caption in the caption's order (left to right in the image: object k is
    region k + 1) and its background kind. ``ValueError`` naming the caption when it does not follow the grammar."""
    text = _check_text("scenes", caption)
    m = _SCENE.fullmatch(text)
    if m is None:
        raise _unreadable("scenes", caption, "expected 'a photo of a <object> and a <object> ... on a <background> background'")
    objects, background = m.groups()
    if background not in BACKGROUNDS:
        raise _unreadable("scenes", caption, f"background {background!r} is not one of {BACKGROUNDS}")
    return [_scene_object(caption, p) for p in objects.split(" and ")], background


def parse_scenes_caption(caption: str) -> dict[str, str | frozenset[str]]:
    """``a photo of a red square and a blue striped circle on a plain background`` ->
    ``{"objects": "2", "shapes": {"square", "circle"}, "colours": {"red", "blue"}}``."""
    parsed, _ = scene_objects(caption)
    return {"objects": str(len(parsed)), "shapes": frozenset(o.shape for o in parsed),
            "colours": frozenset(o.colour for o in parsed)}


def parse_cxr_caption(caption: str) -> dict[str, frozenset[str]]:
    """``a chest x-ray with cardiomegaly and effusion`` -> ``{"findings": {"cardiomegaly", "effusion"}}``;
    ``... with no finding`` -> the empty set."""
    text = _check_text("cxr", caption)
    m = _CXR.fullmatch(text)
    if m is None:
        raise _unreadable("cxr", caption, f"expected {CXR_PROMPT.format('<finding> and <finding> ...')!r} "
                                          f"or {CXR_PROMPT.format(NO_FINDING)!r}")
    body = m.group(1)
    if body == NO_FINDING:
        return {"findings": frozenset()}
    found = body.split(" and ")
    unknown = [f for f in found if f not in CXR_FINDINGS]
    if unknown:
        raise _unreadable("cxr", caption, f"unknown finding(s) {unknown}; known: {', '.join(CXR_FINDINGS)}")
    if len(set(found)) != len(found):
        raise _unreadable("cxr", caption, "a finding is listed twice")
    return {"findings": frozenset(found)}


PARSERS = {"derm": parse_derm_caption, "scenes": parse_scenes_caption, "cxr": parse_cxr_caption}


def parse_caption(domain: str, caption: str) -> dict[str, str | frozenset[str]]:
    """The attributes a caption of ``domain`` states (module docstring)."""
    if domain not in PARSERS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return PARSERS[domain](caption)


@dataclass(frozen=True)
class Attribute:
    """One attribute: ``kind`` is ``"class"`` (one of ``values``) or ``"multi-hot"`` (a subset of ``values``)."""

    name: str
    kind: str
    values: tuple[str, ...]

    def __post_init__(self):
        if self.kind not in (CLASS, MULTI):
            raise ValueError(f"attribute {self.name!r}: kind {self.kind!r} is not {CLASS!r} or {MULTI!r}")
        if len(self.values) < (2 if self.kind == CLASS else 1):
            raise ValueError(f"attribute {self.name!r} ({self.kind}) needs at least "
                             f"{2 if self.kind == CLASS else 1} values, got {self.values}")


# Fixed vocabularies (in a stable order); None = the values that occur, sorted (the number of objects).
_VOCAB: dict[str, tuple[tuple[str, str, tuple[str, ...] | None], ...]] = {
    "derm": (("size", CLASS, DERM_SIZES), ("contrast", CLASS, DERM_CONTRASTS)),
    "scenes": (("objects", CLASS, None), ("shapes", MULTI, SCENE_SHAPES), ("colours", MULTI, SCENE_COLOURS)),
    "cxr": (("findings", MULTI, CXR_FINDINGS),),
}


@dataclass(frozen=True)
class AttributeSchema:
    """The attributes of one domain with their classes / label vocabularies, and the caption encoder."""

    domain: str
    attributes: tuple[Attribute, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def __getitem__(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(f"no attribute {name!r} in the {self.domain} schema ({', '.join(self.names)})")

    def encode(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """Captions -> ``{attribute: labels}``: ``int64 (N,)`` class indices or ``float32 (N, K)`` multi-hot."""
        parsed = [parse_caption(self.domain, c) for c in captions]
        return {a.name: _encode_one(a, [p[a.name] for p in parsed], captions) for a in self.attributes}


def _encode_one(attr: Attribute, values: list, captions: Sequence[str]) -> np.ndarray:
    index = {v: i for i, v in enumerate(attr.values)}
    if attr.kind == CLASS:
        out = np.empty(len(values), np.int64)
        for i, v in enumerate(values):
            if v not in index:
                raise ValueError(f"caption {captions[i]!r}: {attr.name} {v!r} is not a class of this schema "
                                 f"{attr.values}; build the schema from every caption you will encode")
            out[i] = index[v]
        return out
    out = np.zeros((len(values), len(attr.values)), np.float32)
    for i, vs in enumerate(values):
        missing = sorted(set(vs) - set(index))
        if missing:
            raise ValueError(f"caption {captions[i]!r}: {attr.name} {missing} not in this schema's labels "
                             f"{attr.values}; build the schema from every caption you will encode")
        out[i, [index[v] for v in vs]] = 1.0
    return out


def attribute_schema(domain: str, captions: Iterable[str]) -> AttributeSchema:
    """The schema of ``domain`` restricted to the values that occur in ``captions``.

    Build it from every caption that will be encoded (training and held-out), so a held-out value unseen in
    training still has a label (the classifier then simply never predicts it). Class attributes keep their
    full fixed vocabulary (derm's three sizes and two contrasts), so indices mean the same in every run.
    """
    captions = list(captions)
    if not captions:
        raise ValueError(f"attribute_schema({domain!r}): no captions to build the schema from")
    parsed = [parse_caption(domain, c) for c in captions]
    attrs = []
    for name, kind, vocab in _VOCAB[domain]:
        seen = {p[name] for p in parsed} if kind == CLASS else set().union(*(p[name] for p in parsed))
        if vocab is None:
            values = tuple(sorted(seen, key=int))
        elif kind == CLASS:
            values = vocab
        else:
            values = tuple(v for v in vocab if v in seen)
        if kind == MULTI and not values:
            raise ValueError(f"{domain}: no caption names any {name} (e.g. {captions[0]!r}); "
                             f"a multi-hot attribute needs at least one positive")
        if kind == CLASS and len(values) < 2:
            raise ValueError(f"{domain}: every caption has {name} = {values}; a class attribute needs two classes")
        attrs.append(Attribute(name, kind, values))
    return AttributeSchema(domain, tuple(attrs))


def caption_labels(domain: str, captions: Sequence[str], schema: AttributeSchema | None = None
                   ) -> tuple[AttributeSchema, dict[str, np.ndarray]]:
    """``(schema, schema.encode(captions))``; the schema is built from ``captions`` when not given."""
    schema = schema or attribute_schema(domain, captions)
    return schema, schema.encode(captions)


def label_counts(schema: AttributeSchema, labels: Mapping[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """How often each class / label occurs: ``{attribute: {value: count}}`` (for the chapter's tables)."""
    out = {}
    for a in schema.attributes:
        y = np.asarray(labels[a.name])
        counts = np.bincount(y, minlength=len(a.values)) if a.kind == CLASS else y.sum(0).astype(int)
        out[a.name] = {v: int(c) for v, c in zip(a.values, counts)}
    return out


__all__ = ["CLASS", "MULTI", "CXR_FINDINGS", "DERM_SIZES", "DERM_CONTRASTS", "SCENE_SHAPES", "SCENE_COLOURS",
           "Attribute", "AttributeSchema", "attribute_schema", "caption_labels", "label_counts", "parse_caption",
           "parse_derm_caption", "scene_objects", "parse_scenes_caption", "parse_cxr_caption"]
