"""The DermPrompt vocabulary (thesis §4.3.2): every word the attribute captioner can write.

The thesis asks its VLM for the lesion's size, shape, colour and position and the skin's colour, hair
and artificial marks; these tuples are the closed set of values the offline captioner names them with
(the VLM back-end may answer free text). ``dermprompt_vocabulary`` lists them as phrases for the mini
tokenizer, so that each word is one token.
"""
from __future__ import annotations

PREFIX = "An image of <lesion> on <skin>"
SIZES = ("small", "medium", "large")
SHAPES = ("round", "oval", "irregular")
LESION_COLOURS = ("black", "dark brown", "brown", "light brown", "red", "pink", "blue-grey", "grey", "white")
SKIN_COLOURS = ("very light", "light", "intermediate", "tan", "brown", "dark")  # Fitzpatrick I..VI (ITA, §5.2)
POSITIONS = ("in the centre", "at the top", "at the bottom", "on the left", "on the right", "in the upper left",
             "in the upper right", "in the lower left", "in the lower right")
MARKS = ("a dark frame", "purple ink marks")


def dermprompt_vocabulary(prefix: str = PREFIX) -> list[str]:
    """Every phrase the attribute captioner can write, as sentences: give them to
    ``build_caption_tokenizer`` (corpora or ``extra_words``) so that each word is one token of a mini tokenizer."""
    out = [prefix, "a an lesion on skin with and"]
    out += list(SIZES) + list(SHAPES) + list(LESION_COLOURS) + list(POSITIONS) + list(MARKS)
    out += [f"{c} skin" for c in SKIN_COLOURS] + ["hair"]
    return out


__all__ = ["PREFIX", "SIZES", "SHAPES", "LESION_COLOURS", "SKIN_COLOURS", "POSITIONS", "MARKS", "dermprompt_vocabulary"]
