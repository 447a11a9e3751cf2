"""The one token lookup (``ctrlgen.models.tokens.locate_tokens``): positions and end positions counted by hand,
and a clear error naming the token and the prompt on a miss."""
from __future__ import annotations

import pytest
import torch

from ctrlgen.models import build_caption_tokenizer
from ctrlgen.models.tokens import end_position, locate_tokens, token_id, token_positions


@pytest.fixture(scope="module")
def tok():
    t = build_caption_tokenizer(["an image of a lesion on skin", "a small brown lesion"], model_max_length=12)
    t.add_tokens(["<lesion>", "<skin>"])
    return t


def test_positions_and_ends_by_hand(tok):
    # start, an, image, of, <lesion>, on, <skin>, end -> <lesion> at 4, <skin> at 6, end at 7
    prompts = ["an image of <lesion> on <skin>", "an image of <lesion> on <skin> a small lesion"]
    loc = locate_tokens(tok, prompts, ["<lesion>", "<skin>"])
    assert loc.positions.tolist() == [[4, 6], [4, 6]] and loc.ends.tolist() == [7, 10]
    assert loc.position("<lesion>") == 4
    padded = tok(prompts, padding="max_length", max_length=12, return_tensors="pt").input_ids
    same = locate_tokens(tok, padded, ["<lesion>", "<skin>"])
    assert torch.equal(same.positions, loc.positions) and torch.equal(same.ends, loc.ends)
    assert end_position(tok, prompts[0]) == 7 and token_positions(tok, "a lesion , a lesion", "lesion") == [2, 5]
    assert token_id(tok, "lesion") == tok.convert_tokens_to_ids("lesion</w>")  # a plain word finds its BPE form


def test_a_missing_token_raises_naming_the_token_and_the_prompt(tok):
    with pytest.raises(ValueError, match=r"'<lesion>' does not occur in the prompt 'an image of skin'"):
        locate_tokens(tok, ["an image of <lesion>", "an image of skin"], "<lesion>")
    with pytest.raises(ValueError, match=r"'<lesion>' does not occur in the prompt 'an image of a small brown lesion"):
        locate_tokens(tok, "an image of a small brown lesion on skin , a small lesion <lesion>", "<lesion>")  # cut at 12
    with pytest.raises(ValueError, match=r"'<mole>' is not in the tokenizer's vocabulary"):
        locate_tokens(tok, "an image of <lesion>", "<mole>")
    with pytest.raises(ValueError, match="different positions"):
        locate_tokens(tok, ["an image of <lesion>", "<lesion> on skin"], "<lesion>").position("<lesion>")
