"""Further controllability of the region-aware model (thesis §4.4.6, Fig. 4.8–4.10).

* Text-guided attribute customisation (Fig. 4.8): prompts that change one DermPrompt attribute
  (skin colour, lesion colour, marks) of a base attribute set, all from the DermPrompt vocabulary,
  sampled from the same initial noise so that only the attribute differs (``ctrlgen.sampling.text_to_image``
  with ``same_noise``).
* Bounding-box layout guidance (Fig. 4.9): BoxDiff's box constraints on the ``<lesion>``
  cross-attention (``ctrlgen.methods.baselines.boxdiff``) through the same sampling loop.
* Real-image editing (Fig. 4.10): Null-text inversion with the image's prompt, then sampling with an
  edited prompt under Prompt-to-Prompt attention control, as Mokady et al. (2023) edit
  (``ctrlgen.methods.baselines.null_text_inversion``, ``ctrlgen.attention.prompt_to_prompt``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch

from ctrlgen.attention.prompt_to_prompt import AlignMode
from ctrlgen.guidance import TokenMap
from ctrlgen.methods.baselines.boxdiff import BoxDiffConfig, box_guidance, box_masks
from ctrlgen.methods.baselines.null_text_inversion import NullTextConfig, NullTextInversion, edit_image
from ctrlgen.methods.didgen.dermprompt import (
    DROP_ORDER,
    LESION_COLOURS,
    MARKS,
    PREFIX,
    SKIN_COLOURS,
    DermAttributes,
    PromptTooLongError,
    compose_prompt,
    count_tokens,
)
from ctrlgen.models.sd import SDComponents
from ctrlgen.models.tokens import locate_tokens
from ctrlgen.sampling import text_to_image

CUSTOMISABLE = {"skin_colour": SKIN_COLOURS, "lesion_colour": LESION_COLOURS, "marks": tuple((m,) for m in MARKS) + ((),)}


def customisation_prompts(base: DermAttributes, attribute: str, values: Sequence[Any] | None = None, tokenizer=None,
                          prefix: str = PREFIX) -> list[tuple[Any, str]]:
    """``(value, prompt)`` for each value of one attribute in ``CUSTOMISABLE`` (default: the whole vocabulary),
    the rest of ``base`` unchanged. With a tokenizer the prompts are fitted to its limit: other attributes are
    dropped in ``DROP_ORDER`` — the same ones for the whole row, so that only ``attribute`` differs — and the
    customised attribute never (``PromptTooLongError`` if the row cannot fit with it)."""
    if attribute not in CUSTOMISABLE:
        raise ValueError(f"attribute {attribute!r} cannot be customised; choose one of {', '.join(CUSTOMISABLE)}")
    vals = list(values) if values is not None else list(CUSTOMISABLE[attribute])
    vals = [(tuple(v) if not isinstance(v, str) else (v,)) if attribute == "marks" else v for v in vals]
    rows = [replace(base, **{attribute: v}) for v in vals]
    if tokenizer is not None:
        limit = int(tokenizer.model_max_length)
        droppable = [d for d in DROP_ORDER if d != attribute]
        dropped: list[str] = []
        while any(count_tokens(tokenizer, compose_prompt(a.without(dropped), prefix)) > limit for a in rows):
            left = [d for d in droppable if d not in dropped and any(getattr(a, d) for a in rows)]
            if not left:
                raise PromptTooLongError(f"a {attribute} row does not fit the text encoder's {limit} tokens even "
                                         f"without {', '.join(dropped) or 'any other attribute'}")
            dropped.append(left[0])
        rows = [a.without(dropped) for a in rows]
    return [(v, compose_prompt(a, prefix)) for v, a in zip(vals, rows)]


def customise(model: SDComponents, base: DermAttributes, attribute: str, values: Sequence[Any] | None = None,
              num_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0) -> tuple[list[Any], list[str], torch.Tensor]:
    """One row of Fig. 4.8: the values, their prompts and the images (same initial noise)."""
    pairs = customisation_prompts(base, attribute, values, model.tokenizer)
    prompts = [p for _, p in pairs]
    images = text_to_image(model, prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                           same_noise=True).images
    return [v for v, _ in pairs], prompts, images


def box_guided_generate(model: SDComponents, prompts: Sequence[str], boxes: Sequence[Sequence[float]], num_steps: int,
                        guidance_scale: float, eta: float, guidance_fraction: float, cross_res: int,
                        lesion_token: str = "<lesion>", seed: int = 0, box: BoxDiffConfig = BoxDiffConfig(),
                        smoothing: Mapping[str, Any] | None = None, normalize: str = "none"
                        ) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Fig. 4.9: images whose lesion follows boxes ``(x0, y0, x1, y1)`` (image fractions), one box per prompt.

    ``box``: BoxDiff's P and L (``BoxDiffConfig.from_profile``); ``smoothing`` (softmax_scale, kernel, sigma) and
    ``normalize`` as the pair pipeline's layout guidance uses them (``LayoutGuidanceSettings``). Returns images ``(B, 3, H, W)`` in [0, 1] and the
    guidance loss history (``ib``, ``ob``, ``cc``)."""
    if len(prompts) != len(boxes):
        raise ValueError("give one box per prompt")
    loc = locate_tokens(model.tokenizer, list(prompts), lesion_token)
    sm = dict(smoothing or {})
    tmap = TokenMap(loc.position(lesion_token), tuple(loc.ends.tolist()), cross_res, float(sm.get("softmax_scale", 100.0)),
                    int(sm.get("kernel", 3)), float(sm.get("sigma", 0.5)))
    guide = box_guidance(box_masks(boxes, cross_res), tmap, eta, guidance_fraction, box, normalize=normalize)
    images = text_to_image(model, prompts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                           refiner=guide).images
    return images, guide.history


def edit_real_image(model: SDComponents, image: np.ndarray, prompt: str, edited_prompts: Sequence[str], num_steps: int,
                    guidance_scale: float = 7.5, config: NullTextConfig | None = None, p2p: bool = True,
                    alignment: AlignMode = "auto", **overrides: Any) -> tuple[torch.Tensor, NullTextInversion]:
    """Fig. 4.10: a real image ``(H, W, 3)`` uint8 at the model's resolution, edited by prompt after
    Null-text inversion, with Prompt-to-Prompt attention control unless ``p2p=False``
    (``ctrlgen.methods.baselines.null_text_inversion.edit_image``). ``config``: the inversion and P2P settings
    (``NullTextConfig.from_profile``; default the authors' code's); keyword ``overrides`` replace its fields
    (e.g. ``inner_steps=3``; an unknown name raises). Returns ``(1 + E, 3, H, W)`` in [0, 1] (reconstruction,
    then the edits)."""
    unknown = set(overrides) - {f.name for f in fields(NullTextConfig)}
    if unknown:
        raise TypeError(f"edit_real_image: unknown setting(s) {sorted(unknown)}; NullTextConfig fields are "
                        f"{', '.join(f.name for f in fields(NullTextConfig))}")
    config = replace(config or NullTextConfig(), **overrides)
    x = torch.from_numpy(np.ascontiguousarray(image)).float().permute(2, 0, 1)[None] / 255.0 * 2 - 1
    return edit_image(model, x.to(model.device), prompt, edited_prompts, num_steps, guidance_scale, config, p2p=p2p,
                      alignment=alignment)


__all__ = ["CUSTOMISABLE", "customisation_prompts", "customise", "box_guided_generate", "edit_real_image"]
