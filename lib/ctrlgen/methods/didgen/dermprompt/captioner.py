"""The DermPrompt captioner interface (thesis §4.3.2): ``caption(image, mask)`` → ``Caption``, and a dataset
captioned once per image and captioner fingerprint through ``CaptionCache``."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ctrlgen.methods.didgen.dermprompt.cache import CaptionCache
from ctrlgen.methods.didgen.dermprompt.prompt import Caption, DermAttributes, fit_prompt
from ctrlgen.methods.didgen.dermprompt.vocabulary import PREFIX


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


__all__ = ["DermPromptCaptioner"]
