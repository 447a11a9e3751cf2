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


@dataclass(frozen=True)
class TokenLocation:
    """Where tokens sit in tokenised prompts (start token at position 0).

    ``positions[b, k]``: first position of ``tokens[k]`` in prompt ``b``; ``ends[b]``: position of
    prompt ``b``'s end token (the ``last`` of ``ctrlgen.attention.maps.text_token_softmax``).
    """

    tokens: tuple[str, ...]
    positions: torch.Tensor  # (B, K) long
    ends: torch.Tensor       # (B,) long

    def position(self, token: str) -> int:
        """The one position of ``token`` shared by every prompt; ValueError if the prompts disagree."""
        col = self.positions[:, self.tokens.index(token)]
        if bool((col != col[0]).any()):
            raise ValueError(f"{token!r} sits at different positions {sorted(set(col.tolist()))} in these prompts: "
                             "use one prefix for the batch")
        return int(col[0])


def token_id(tokenizer, token: str) -> int:
    """Vocabulary id of ``token``; a plain word also matches its word-final BPE form ``word</w>`` (CLIP).

    Raises ``ValueError`` naming the token when the vocabulary has neither (``convert_tokens_to_ids``
    would silently return the unknown token, which is the end token in CLIP tokenizers).
    """
    vocab = tokenizer.get_vocab()
    for form in (token, token + "</w>"):
        if form in vocab:
            return int(vocab[form])
    raise ValueError(f"{token!r} is not in the tokenizer's vocabulary (add it with add_placeholder_tokens first)")


def _rows(tokenizer, prompts: str | Sequence[str] | torch.Tensor) -> tuple[list[list[int]], list[str]]:
    """Token-id rows and the prompt text of each (decoded from the ids when ids are given)."""
    if isinstance(prompts, torch.Tensor):
        rows = prompts.reshape(-1, prompts.shape[-1]).tolist()
        return rows, [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    enc = tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    return [list(r) for r in enc], texts


def _end(row: list[int], eos: int | None) -> int:
    # the first end token after the start token (padding may repeat it), else the last position (no end token)
    return row.index(eos, 1) if eos is not None and eos in row[1:] else len(row) - 1


def locate_tokens(tokenizer, prompts: str | Sequence[str] | torch.Tensor, tokens: str | Sequence[str] = ()) -> TokenLocation:
    """The one token lookup: first position of each of ``tokens`` and the end position, per prompt.

    ``prompts`` are strings (tokenised with truncation to ``model_max_length``, as the text encoder
    sees them) or already tokenised ids ``(B, L)`` (e.g. ``SDComponents.tokenize``; padding is fine).
    Raises ``ValueError`` naming the token and the prompt when a token is missing from a prompt
    (absent, or cut off by truncation) or from the vocabulary.
    """
    tokens = (tokens,) if isinstance(tokens, str) else tuple(tokens)
    ids = [token_id(tokenizer, t) for t in tokens]
    rows, texts = _rows(tokenizer, prompts)
    pos = torch.zeros(len(rows), len(tokens), dtype=torch.long)
    for b, row in enumerate(rows):
        for k, tid in enumerate(ids):
            if tid not in row:
                raise ValueError(f"{tokens[k]!r} does not occur in the prompt {texts[b]!r} after tokenisation "
                                 f"({len(row)} tokens; truncated?)")
            pos[b, k] = row.index(tid)
    ends = torch.tensor([_end(r, tokenizer.eos_token_id) for r in rows], dtype=torch.long)
    return TokenLocation(tokens, pos, ends)


def token_positions(tokenizer, prompt: str, token: str) -> list[int]:
    """Every position of ``token`` in the encoded ``prompt`` (``locate_tokens`` gives the first; same errors)."""
    first = int(locate_tokens(tokenizer, prompt, token).positions[0, 0])
    row = _rows(tokenizer, prompt)[0][0]
    tid = row[first]
    return [i for i, t in enumerate(row) if t == tid]


def end_position(tokenizer, prompt: str) -> int:
    """Index of the end token of ``prompt`` (the ``last`` of ``text_token_softmax``), via ``locate_tokens``."""
    return int(locate_tokens(tokenizer, prompt).ends[0])
