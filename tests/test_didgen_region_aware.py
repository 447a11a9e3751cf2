"""Region-aware finetuning (§4.3.3): frozen P-Tokens, Eq. (4.5) on hand-built maps, the training step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrlgen.config import load_profile
from ctrlgen.methods.didgen.region_aware import (
    RegionAwareConfig,
    region_aware_batches,
    region_aware_finetune,
    setup_placeholders,
)
from ctrlgen.models import build_caption_tokenizer, build_mini_components
from ctrlgen.training import AttentionAlignmentTerm, LossContext

PROMPTS = ["an image of <lesion> on <skin>", "an image of <lesion> on <skin>, a small lesion"]


def tiny():
    cfg = load_profile("smoke")
    tok = build_caption_tokenizer(["an image of a small lesion on skin"], model_max_length=16)
    return cfg, build_mini_components(cfg, tok)


def data(n=4, side=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, side, side, 3), dtype=np.uint8)
    masks = np.zeros((n, side, side), bool)
    masks[:, 8:24, 10:22] = True
    return images, masks, [PROMPTS[i % 2] for i in range(n)]


def test_placeholders_are_initialised_from_their_words_and_existing_ones_kept():
    _, model = tiny()
    emb = model.text_encoder.get_input_embeddings().weight
    tokens = setup_placeholders(model)
    word = lambda w: model.tokenizer(w, add_special_tokens=False)["input_ids"]  # noqa: E731
    for t, w in zip(tokens.tokens, ("lesion", "skin")):
        emb = model.text_encoder.get_input_embeddings().weight
        assert torch.allclose(emb[tokens.id_of(t)], emb[word(w)].mean(0))
    with torch.no_grad():
        emb[tokens.ids[0]] += 1.0  # as if pretrained
    kept = emb[tokens.ids[0]].clone()
    again = setup_placeholders(model)
    assert again.ids == tokens.ids and torch.equal(model.text_encoder.get_input_embeddings().weight[tokens.ids[0]], kept)


def test_attention_loss_on_hand_built_maps_is_eq_4_5_with_pixel_means():
    _, model = tiny()
    tokens = setup_placeholders(model)
    images, masks, prompts = data(2, 32)
    batch = next(region_aware_batches(model, images, masks, prompts, tokens, batch_size=2, hflip=False))
    li, si = batch["token_indices"][0].tolist()
    assert model.tokenize(prompts[:1])[0, li] == tokens.id_of("<lesion>") and li == 4 and si == 6
    # hand-built 8x8 maps: <lesion> attends 0.6 inside the (pooled) mask, 0.1 outside; <skin> 0.2 everywhere
    m8 = torch.nn.functional.avg_pool2d(torch.from_numpy(masks[:2, None]).float(), 4)[:, 0]  # (2, 8, 8)
    maps = torch.zeros(2, 8, 8, 16)
    maps[..., li] = 0.1 + 0.5 * m8
    maps[..., si] = 0.2
    store = type("S", (), {"cross_by_res": lambda self: {8: maps}})()
    term = AttentionAlignmentTerm(weight=0.1)
    got = term(LossContext(batch, None, None, None, store))
    order = batch["token_masks"][:, 0].sum((-1, -2))  # batches are shuffled; masks are identical anyway
    m = m8[0]
    expected = 0.5 * (((0.1 + 0.5 * m - m) ** 2).mean() + ((0.2 - (1 - m)) ** 2).mean())
    assert order.shape == (2,) and torch.isclose(got, expected, atol=1e-6)


def test_finetune_step_trains_unet_only_with_rec_plus_alpha_attn():
    cfg, model = tiny()
    te_before = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    unet_before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    images, masks, prompts = data()
    rc = RegionAwareConfig.from_profile(cfg, steps=2, batch_size=2, lr=1e-3)
    assert rc.alpha == 0.1 and rc.cross_res == (8, 4)
    res, tokens = region_aware_finetune(model, images, masks, prompts, rc, progress=False)
    assert res.steps == 2
    for h in res.history:
        assert h["attn"] > 0 and abs(h["loss"] - (h["rec"] + 0.1 * h["attn"])) < 1e-5
    assert all(torch.equal(te_before[n], p) for n, p in model.text_encoder.named_parameters() if n in te_before
               and p.shape == te_before[n].shape)
    assert any(not torch.equal(unet_before[n], p) for n, p in model.unet.named_parameters())


def test_prompt_without_placeholder_is_refused():
    _, model = tiny()
    tokens = setup_placeholders(model)
    images, masks, _ = data(2)
    with pytest.raises(ValueError, match="'<lesion>' does not occur in the prompt 'an image of skin'"):
        next(region_aware_batches(model, images, masks, ["an image of skin"] * 2, tokens, 2))
