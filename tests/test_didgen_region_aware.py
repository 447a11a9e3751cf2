"""Region-aware finetuning (§4.3.3): frozen P-Tokens, Eq. (4.5) on hand-built maps, the training step."""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from ctrlgen.config import load_profile
from ctrlgen.data.tensors import image_tensor
from ctrlgen.methods.didgen.region_aware import (
    RegionAwareConfig,
    region_aware_batches,
    region_aware_finetune,
    setup_placeholders,
)
from ctrlgen.methods.didgen.dermprompt import POSITIONS, dermprompt_vocabulary
from ctrlgen.models import build_caption_tokenizer, build_mini_components
from ctrlgen.training import AttentionAlignmentTerm, LossContext, mirror_sides

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
    """The text encoder is frozen — every row of the embedding matrix that existed before the P-Tokens were
    added, and the P-Token rows as initialised, compared over the rows both matrices have (the resize grows it)."""
    cfg, model = tiny()
    emb_before = model.text_encoder.get_input_embeddings().weight.detach().clone()
    te_before = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    unet_before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    tokens = setup_placeholders(model)
    emb_with_tokens = model.text_encoder.get_input_embeddings().weight.detach().clone()
    assert emb_with_tokens.shape[0] == emb_before.shape[0] + 2 and min(tokens.ids) >= emb_before.shape[0]
    images, masks, prompts = data()
    rc = RegionAwareConfig.from_profile(cfg, steps=2, batch_size=2, lr=1e-3)
    assert rc.alpha == 0.1 and rc.cross_res == (8, 4) and rc.adam_betas == (0.9, 0.999) and rc.adam_eps == 1e-8
    res, tokens = region_aware_finetune(model, images, masks, prompts, rc, tokens=tokens, progress=False)
    assert res.steps == 2
    for h in res.history:
        assert h["attn"] > 0 and abs(h["loss"] - (h["rec"] + 0.1 * h["attn"])) < 1e-5
    emb_after = model.text_encoder.get_input_embeddings().weight.detach()
    n_old = emb_before.shape[0]
    assert torch.equal(emb_after[:n_old], emb_before)  # the existing vocabulary
    assert torch.equal(emb_after[list(tokens.ids)], emb_with_tokens[list(tokens.ids)])  # the frozen P-Tokens
    emb_name = next(n for n, p in model.text_encoder.named_parameters() if p is model.text_encoder.get_input_embeddings().weight)
    assert all(torch.equal(te_before[n], p) for n, p in model.text_encoder.named_parameters() if n != emb_name)
    assert any(not torch.equal(unet_before[n], p) for n, p in model.unet.named_parameters())


def test_train_config_repeating_an_argument_follows_the_merge_rule_instead_of_a_duplicate_keyword_error(monkeypatch):
    """``train_config`` wins over the config's own value (``train_config_from``): steps 1, lr 0.5 reach the loop."""
    import ctrlgen.methods.didgen.region_aware as ra

    cfg, model = tiny()
    seen = {}
    monkeypatch.setattr(ra, "train_diffusion", lambda model, data, tc, *a, **k: seen.setdefault("tc", tc))
    images, masks, prompts = data()
    rc = RegionAwareConfig.from_profile(cfg, steps=2, batch_size=2, lr=1e-3)
    region_aware_finetune(model, images, masks, prompts, rc, train_config={"steps": 1, "lr": 0.5, "betas": [0.8, 0.9]},
                          progress=False)
    tc = seen["tc"]
    assert (tc.steps, tc.lr, tc.betas, tc.weight_decay, tc.cross_res) == (1, 0.5, (0.8, 0.9), rc.weight_decay, (8, 4))
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['step'\].*steps"):
        region_aware_finetune(model, images, masks, prompts, rc, train_config={"step": 1}, progress=False)


def test_mirror_sides_on_every_position_phrase_the_captioner_writes():
    by_hand = {"in the centre": "in the centre", "at the top": "at the top", "at the bottom": "at the bottom",
               "on the left": "on the right", "on the right": "on the left",
               "in the upper left": "in the upper right", "in the upper right": "in the upper left",
               "in the lower left": "in the lower right", "in the lower right": "in the lower left"}
    assert set(by_hand) == set(POSITIONS)
    for phrase, mirrored in by_hand.items():
        assert mirror_sides(phrase) == mirrored and mirror_sides(mirrored) == phrase
    for phrase in dermprompt_vocabulary():  # nothing else in the vocabulary names a side
        if phrase not in POSITIONS:
            assert mirror_sides(phrase) == phrase
    assert mirror_sides("An image of <lesion> on <skin>, a small brown lesion in the upper left on light skin") == \
        "An image of <lesion> on <skin>, a small brown lesion in the upper right on light skin"
    # free text (VLM captions): case, compounds; words that only contain a side are left alone
    assert mirror_sides("Left side, right-hand border, leftmost; bright, lefty, RIGHT") == \
        "Right side, left-hand border, rightmost; bright, lefty, LEFT"


def test_flipped_samples_get_the_mirrored_prompt_and_the_others_their_own():
    tok = build_caption_tokenizer(dermprompt_vocabulary(), model_max_length=32)
    model = build_mini_components(load_profile("smoke"), tok)
    tokens = setup_placeholders(model)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((4, 32, 32), bool)
    masks[:, 8:24, 2:12] = True  # lesions on the left
    prompts = [f"An image of <lesion> on <skin>, a small lesion {p}" for p in
               ("on the left", "in the upper left", "in the lower left", "in the centre")]
    text = lambda ids: " ".join(model.tokenizer.decode(ids, skip_special_tokens=True).split())  # noqa: E731
    plain = [text(i) for i in model.tokenize(prompts)]
    flipped_any = kept_any = False
    for batch in islice(region_aware_batches(model, images, masks, prompts, tokens, batch_size=2, seed=0), 6):
        for k in range(2):
            img = batch["pixel_values"][k]
            src = next(i for i in range(4) if torch.equal(img, image_tensor(images[i:i + 1])[0])
                       or torch.equal(img, image_tensor(images[i:i + 1])[0].flip(-1)))
            flipped = bool(batch["flipped"][k])
            words = text(batch["input_ids"][k])
            m = batch["mask"][k, 0].numpy() > 0.5
            if flipped:
                flipped_any = True
                assert torch.equal(img, image_tensor(images[src:src + 1])[0].flip(-1)) and np.array_equal(m, masks[src, :, ::-1])
                assert words == plain[src].replace("left", "right")
            else:
                kept_any = True
                assert np.array_equal(m, masks[src]) and words == plain[src]
    assert flipped_any and kept_any
    assert all("right" not in p for p in plain) and "right" in mirror_sides(prompts[0])


def test_prompt_without_placeholder_is_refused():
    _, model = tiny()
    tokens = setup_placeholders(model)
    images, masks, _ = data(2)
    with pytest.raises(ValueError, match="'<lesion>' does not occur in the prompt 'an image of skin'"):
        next(region_aware_batches(model, images, masks, ["an image of skin"] * 2, tokens, 2))
