"""A CLIP-format tokenizer whose vocabulary the project builds from its own caption corpora.

The mini models are trained from scratch, so their tokenizer need not be CLIP's 49k-token BPE:
it is a ``CLIPTokenizer`` (same normaliser, pre-tokeniser, ``</w>`` word ends, start/end tokens,
so everything downstream treats it exactly like SD's) whose byte-pair merges are learned on the
captions until every word of the corpus is a single token (a word-level vocabulary, as in
NOTES-mini-feasibility.md). Rare words (below ``min_frequency``) stay split into pieces.

transformers 5 ignores ``vocab_file=``; the tokenizer is built from ``vocab=``/``merges=`` and
saved/loaded with ``save_pretrained``/``CLIPTokenizer.from_pretrained(dir)``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_caption_tokenizer(corpora: Iterable[str], max_vocab: int = 4096, min_frequency: int = 1,
                            extra_words: Iterable[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """Learn a CLIP-format BPE tokenizer on ``corpora`` (caption strings) plus ``extra_words``.

    ``max_vocab`` caps the vocabulary (byte alphabet with and without ``</w>``, merges, two special
    tokens); ``extra_words`` are words that must be whole tokens even if absent from the captions
    (e.g. the initialisation words of placeholder tokens, "lesion", "skin").
    """
    template = CLIPTokenizer()  # empty vocabulary: only its normaliser and pre-tokeniser are used
    bpe = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False))
    bpe.normalizer = template.backend_tokenizer.normalizer
    bpe.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # a set's order changes between processes: ids would too
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab, min_frequency=min_frequency, show_progress=False, special_tokens=[BOS, EOS],
        initial_alphabet=alphabet, end_of_word_suffix="</w>", limit_alphabet=len(alphabet),
    )
    texts = list(corpora)
    extra = list(extra_words)
    # extra words are repeated so that they pass min_frequency
    texts += [" ".join(extra)] * max(1, min_frequency)
    bpe.train_from_iterator(texts, trainer)
    spec = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(spec["vocab"])
    for ch in alphabet:  # CLIP keeps every byte both inside a word and at its end
        for tok in (ch, ch + "</w>"):
            if tok not in vocab:
                vocab[tok] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tok


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> Path:
    """Write the tokenizer to ``folder`` (``CLIPTokenizer.from_pretrained(folder)`` reads it back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Read a tokenizer written by ``save_tokenizer`` (or any SD ``tokenizer/`` folder)."""
    return CLIPTokenizer.from_pretrained(str(folder))


def word_pieces(tokenizer: CLIPTokenizer, text: str) -> list[str]:
    """Tokens of ``text`` without start/end tokens (for checks and notebooks)."""
    return tokenizer.tokenize(text)
