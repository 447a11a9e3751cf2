"""Chat vision-language models (the full profile's DermPrompt captioner, thesis §4.3.2): a transformers chat
VLM loaded from a local folder, or a hub id resolved under the profile's models root, on a device and dtype.

Never downloads (``local_files_only=True``). Any chat VLM that ``AutoProcessor`` and
``AutoModelForImageTextToText`` load is accepted; the thesis uses Llama-3.2-11B-Vision-Instruct.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ctrlgen.models.registry import local_folder
from ctrlgen.models.sd import ModelNotFoundError
from ctrlgen.runtime import resolve_device


class HFChatVLM:
    """``generate_fn(messages, image) -> str`` backed by a transformers chat VLM in a local folder (never downloads).

    Loads ``AutoProcessor`` and ``AutoModelForImageTextToText`` with ``local_files_only=True``;
    greedy decoding; returns the newly generated text (the prompt tokens are cut off, special tokens
    skipped). The chat template is rendered to text and then tokenised by the processor together with
    the image; when the rendered prompt already starts with the BOS token (Llama 3.x templates do), the
    tokeniser must not add a second one (``add_special_tokens=False``, as in the Llama-3.2-Vision model
    card and transformers' own ``apply_chat_template(tokenize=True)``). Floating-point inputs (pixel
    values) are cast to the model's dtype. A missing folder raises ``ModelNotFoundError`` (a
    ``FileNotFoundError``) naming the path and what should be there.
    """

    def __init__(self, path: str | Path, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 160):
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ModelNotFoundError(f"no VLM at {p}: put a transformers chat VLM folder there "
                                     "(e.g. meta-llama/Llama-3.2-11B-Vision-Instruct: config.json, processor and weights)")
        self.processor = AutoProcessor.from_pretrained(str(p), local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(
            str(p), local_files_only=True, dtype=getattr(torch, dtype)).to(device).eval()
        self.max_new_tokens = max_new_tokens
        self.name = p.name

    def __call__(self, messages: list[dict[str, Any]], image: Any) -> str:
        """Answer one chat turn (``image`` a PIL image, or None for a text-only turn) greedily."""
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


def load_chat_vlm(cfg: Mapping[str, Any], source: str, dtype: str = "float32", max_new_tokens: int = 160) -> HFChatVLM:
    """``HFChatVLM`` on ``source`` (a local folder, or a hub id looked up as ``<models root>/org--name``) on the
    profile's ``device`` (``auto``: CUDA when available)."""
    return HFChatVLM(local_folder(cfg, source), device=resolve_device(cfg), dtype=dtype, max_new_tokens=max_new_tokens)


__all__ = ["HFChatVLM", "load_chat_vlm"]
