"""One DermPrompt (thesis §4.3.2–4.3.3): its attributes, its sentence, and fitting it to the text encoder.

The training prompt is ``"An image of <lesion> on <skin>"`` followed by one structured sentence::

    An image of <lesion> on <skin>, a small round dark brown lesion in the centre on light skin with hair and a dark frame

Token limit: every prompt is counted with the *real* tokenizer of the model it will condition (start and
end tokens included) against ``tokenizer.model_max_length`` (77 for SD, the profile's ``max_length`` for
the mini models). Nothing is ever truncated silently: attributes are dropped in the order ``DROP_ORDER``
(marks, hair, position, shape, size; lesion and skin colour never) and the dropped ones are recorded in
``Caption.dropped``; if the prompt is still too long, ``PromptTooLongError`` is raised.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ctrlgen.methods.didgen.dermprompt.vocabulary import PREFIX

# attributes removed, in this order, when a prompt does not fit the text encoder (colours are never removed)
DROP_ORDER = ("marks", "hair", "position", "shape", "size")


class PromptTooLongError(ValueError):
    """A prompt that does not fit the text encoder even with every droppable attribute removed."""


class CaptionError(RuntimeError):
    """A caption could not be produced (e.g. a VLM answer that cannot be parsed)."""


@dataclass(frozen=True)
class DermAttributes:
    """The DermPrompt attributes of one image (words from the vocabularies, or VLM free text)."""

    size: str = ""
    shape: str = ""
    lesion_colour: str = ""
    position: str = ""
    skin_colour: str = ""
    hair: bool = False
    marks: tuple[str, ...] = ()

    def without(self, names: Iterable[str]) -> "DermAttributes":
        """A copy with the named attributes blanked (``""``, no hair, no marks)."""
        blank = {"hair": False, "marks": ()}
        return replace(self, **{n: blank.get(n, "") for n in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready attributes (marks as a list)."""
        d = asdict(self)
        d["marks"] = list(self.marks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DermAttributes":
        """Inverse of ``to_dict``; unknown keys are ignored."""
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
        """The caption as a JSON object (the cache's file format)."""
        return {"text": self.text, "attributes": self.attributes.to_dict(), "n_tokens": self.n_tokens,
                "dropped": list(self.dropped), "source": self.source, "measurements": self.measurements}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Caption":
        """Inverse of ``to_json``."""
        return cls(d["text"], DermAttributes.from_dict(d["attributes"]), int(d["n_tokens"]), tuple(d["dropped"]),
                   d["source"], dict(d.get("measurements", {})))


__all__ = ["DROP_ORDER", "PromptTooLongError", "CaptionError", "DermAttributes", "Caption", "sentence",
           "compose_prompt", "count_tokens", "fit_prompt"]
