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

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_caption_tokenizer(corpora: Iterable[str], max_vocab: int = 4096, min_frequency: int = 1,
                            extra_words: Iterable[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """Learn a CLIP-format BPE tokenizer on ``corpora`` (caption strings) plus ``extra_words``.

    ``max_vocab`` caps the vocabulary (byte alphabet with and without ``</w>``, merges, two special
    tokens); ``extra_words`` are words that must be whole tokens even if absent from the captions
    (e.g. the initialisation words of placeholder tokens, "lesion", "skin").

    The merges are learned here rather than by ``tokenizers``' ``BpeTrainer``: that trainer breaks ties
    between equally frequent pairs in hash-map order, which changes between processes, so the same
    captions gave different vocabularies (and so different text encoders) in two fresh caches. Here
    ties go to the lexicographically smallest pair and the result depends on the texts alone.
    """
    template = CLIPTokenizer()  # empty vocabulary: only its normaliser and pre-tokeniser are used
    normalizer = template.backend_tokenizer.normalizer
    pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    texts = list(corpora)
    extra = list(extra_words)
    texts += [" ".join(extra)] * max(1, min_frequency)  # extra words are repeated so that they pass min_frequency
    word_counts: Counter[str] = Counter()
    for text in texts:
        word_counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in [BOS, EOS] + alphabet + [ch + "</w>" for ch in alphabet]:
        vocab.setdefault(tok, len(vocab))
    merges = _learn_merges(word_counts, max_vocab - len(vocab), min_frequency)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _learn_merges(word_counts: Counter[str], budget: int, min_frequency: int) -> list[tuple[str, str]]:
    """Byte-pair merges over ``word_counts`` (pre-tokenised words), most frequent pair first, ties to the
    smallest pair, at most ``budget`` of them, none rarer than ``min_frequency``."""
    words = [(list(w[:-1]) + [w[-1] + "</w>"], n) for w, n in sorted(word_counts.items()) if w]
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, (symbols, n) in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += n
            where.setdefault(pair, set()).add(i)
    merges: list[tuple[str, str]] = []
    while len(merges) < budget and pair_counts:
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        if pair_counts[best] < min_frequency:
            break
        merges.append(best)
        for i in sorted(where.pop(best, ())):
            symbols, n = words[i]
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= n
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            merged, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    merged.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    merged.append(symbols[j])
                    j += 1
            words[i] = (merged, n)
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += n
                where.setdefault(pair, set()).add(i)
    return merges


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> Path:
    """Write the tokenizer to ``folder`` (``CLIPTokenizer.from_pretrained(folder)`` reads it back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Read a tokenizer written by ``save_tokenizer`` (or any SD ``tokenizer/`` folder)."""
    return CLIPTokenizer.from_pretrained(str(folder))
