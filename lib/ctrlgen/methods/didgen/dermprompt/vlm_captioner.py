"""The full profile's DermPrompt back-end (thesis §4.3.2): a chat VLM is asked for the attributes (answered in
JSON), then asked to rephrase them into one sentence under the text encoder's token limit.

The chat function is any ``generate_fn(messages, image) -> str``; by default ``ctrlgen.models.vlm.HFChatVLM``
(Llama-3.2-11B-Vision-Instruct in the thesis, any chat VLM accepted).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ctrlgen.methods.didgen.dermprompt.captioner import DermPromptCaptioner
from ctrlgen.methods.didgen.dermprompt.prompt import Caption, CaptionError, DermAttributes, count_tokens
from ctrlgen.methods.didgen.dermprompt.vocabulary import PREFIX
from ctrlgen.models.vlm import HFChatVLM

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
        """Hash of model, prefix, token limit, both instructions and the fallback's fingerprint (cache key)."""
        blob = json.dumps({"kind": "vlm", "v": 1, "model": self.model_name, "prefix": self.prefix, "max": self.max_tokens,
                           "extract": EXTRACTION_PROMPT, "rephrase": REPHRASE_PROMPT, "words": self.max_words,
                           "fallback": self.fallback.fingerprint() if self.fallback is not None else None})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def extract(self, image: np.ndarray) -> DermAttributes:
        """First turn: the attributes of ``image`` as the VLM answers them (``CaptionError`` if unparseable)."""
        answer = self.generate_fn(_text_message(EXTRACTION_PROMPT, True), Image.fromarray(np.asarray(image)))
        return parse_attribute_answer(answer)

    def rephrase(self, attrs: DermAttributes) -> str:
        """Second turn (text only): the attributes rephrased into one sentence."""
        prompt = REPHRASE_PROMPT.format(max_words=self.max_words, attributes=json.dumps(attrs.to_dict()))
        return clean_sentence(self.generate_fn(_text_message(prompt, False), None))

    def caption(self, image: np.ndarray, mask: np.ndarray | None = None) -> Caption:
        """The VLM's DermPrompt of one image; the mask is used only by the attribute fallback."""
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


__all__ = ["EXTRACTION_PROMPT", "REPHRASE_PROMPT", "GenerateFn", "VLMCaptioner", "parse_attribute_answer",
           "clean_sentence"]
