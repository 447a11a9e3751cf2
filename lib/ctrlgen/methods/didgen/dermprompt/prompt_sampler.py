"""New inference prompts (thesis §4.3.2: the thesis asks the LLM for new prompts built from existing ones):
attribute values observed in training captions, recombined."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np

from ctrlgen.methods.didgen.dermprompt.prompt import Caption, DermAttributes, fit_prompt
from ctrlgen.methods.didgen.dermprompt.vocabulary import PREFIX


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
        counts = Counter(getattr(a, name) for a in self.attributes)
        return [v for v, _ in counts.most_common()]

    def sample(self, n: int, seed: int = 0, mode: str = "marginal", fix: dict[str, Any] | None = None) -> list[Caption]:
        """``n`` prompts drawn with ``numpy.random.default_rng(seed)`` (the same seed, the same prompts)."""
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


__all__ = ["PromptSampler"]
