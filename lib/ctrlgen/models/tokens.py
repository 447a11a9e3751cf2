"""Placeholder tokens (P-Tokens, identifier tokens) as the thesis uses them.

Textual-inversion style (Gal et al., 2023): new tokens such as ``<lesion>``/``<skin>`` (§4.3.3,
initialised from "lesion"/"skin", embeddings frozen) or ``[V1]``, ``[V2]`` (§3.4.1, initialised
from the class name) are added to the tokenizer, the text encoder's embedding matrix is resized
and the new rows are copied from the embedding of an initialisation word.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlaceholderTokens:
    """The added tokens, their ids, and whether their embeddings are meant to be trained."""

    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    init_words: tuple[str, ...]
    trainable: bool

    def id_of(self, token: str) -> int:
        return self.ids[self.tokens.index(token)]


def add_placeholder_tokens(tokenizer, text_encoder: torch.nn.Module, tokens: Sequence[str], init_words: Sequence[str],
                           trainable: bool = False) -> PlaceholderTokens:
    """Add ``tokens``, resize the embeddings and initialise each from its word in ``init_words``.

    A word that the tokenizer splits into several pieces is initialised with the mean of their
    embeddings. Tokens already present keep their id and are re-initialised. ``trainable`` is only
    recorded here; ``ctrlgen.training.select_trainable`` turns it into a masked gradient so that
    only these rows of the embedding matrix change.
    """
    if len(tokens) != len(init_words):
        raise ValueError("give one initialisation word per placeholder token")
    tokenizer.add_tokens(list(tokens))
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    ids = []
    with torch.no_grad():
        for token, word in zip(tokens, init_words):
            tid = tokenizer.convert_tokens_to_ids(token)
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not pieces:
                raise ValueError(f"initialisation word {word!r} gives no tokens")
            if any(p >= emb.shape[0] for p in pieces) or tid in pieces:
                raise ValueError(f"initialisation word {word!r} must be made of existing tokens")
            emb[tid] = emb[pieces].mean(dim=0)
            ids.append(int(tid))
    return PlaceholderTokens(tuple(tokens), tuple(ids), tuple(init_words), trainable)


def token_positions(tokenizer, prompt: str, token: str) -> list[int]:
    """Positions of ``token`` in the encoded ``prompt`` (start token at 0), for selecting its attention map."""
    ids = tokenizer(prompt)["input_ids"]
    tid = tokenizer.convert_tokens_to_ids(token)
    found = [i for i, t in enumerate(ids) if t == tid]
    if not found:
        raise ValueError(f"{token!r} does not occur in the prompt {prompt!r}")
    return found


def end_position(tokenizer, prompt: str) -> int:
    """Index of the end token of ``prompt`` (the ``last`` of ``text_token_softmax``)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return len(ids) - 1
