"""The profile's DermPrompt captioner (``didgen.dermprompt``): the attribute captioner, or the chat VLM with
the attribute captioner as its counted fallback (thesis §4.3.2)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctrlgen.config import ConfigError
from ctrlgen.methods.didgen.dermprompt.attribute_captioner import AttributeCaptioner
from ctrlgen.methods.didgen.dermprompt.captioner import DermPromptCaptioner
from ctrlgen.methods.didgen.dermprompt.vlm_captioner import GenerateFn, VLMCaptioner
from ctrlgen.models.vlm import load_chat_vlm


def captioner_from_profile(cfg: Mapping[str, Any], tokenizer, generate_fn: GenerateFn | None = None
                           ) -> DermPromptCaptioner:
    """The profile's DermPrompt captioner (``didgen.dermprompt.captioner``): ``attributes`` (offline, measured
    from image and mask) or ``vlm`` — ``HFChatVLM`` on ``vlm_model`` (a local folder, or a hub id resolved
    under ``models.root``) on the profile's device in ``vlm_dtype``, with the attribute captioner as the
    counted fallback for answers that cannot be parsed. ``generate_fn`` replaces the VLM (tests, remote
    services)."""
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
        generate_fn = load_chat_vlm(cfg, source, dtype=str(d["vlm_dtype"]), max_new_tokens=int(d["vlm_max_new_tokens"]))
    return VLMCaptioner(tokenizer, generate_fn=generate_fn, prefix=prefix, max_words=int(d["max_words"]),
                        model_name=source or getattr(generate_fn, "name", "custom"), fallback=attributes)


__all__ = ["captioner_from_profile"]
