"""Chapter 3's baselines: prompt, token initialisation and trainable set as their papers and §3.6.3 state them."""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from ctrlgen.config import load_profile
from ctrlgen.methods.attencraft import union_sampler
from ctrlgen.methods.baselines.break_a_scene import BreakASceneConfig, break_a_scene_finetune
from ctrlgen.methods.baselines.custom_diffusion import CustomDiffusionConfig, custom_diffusion_finetune
from ctrlgen.methods.baselines.disendiff import DisenDiffConfig, calibration_losses, disendiff_finetune
from ctrlgen.methods.customization import rare_words
from ctrlgen.models import build_caption_tokenizer, build_mini_components

CAPTIONS = ["a photo of a red circle and a blue square on a plain background",
            "a photo of a green striped triangle and a yellow dotted diamond on a field background"]
CLASSES = ["circle", "square"]


def tiny():
    cfg = load_profile("smoke", {"models.image_size": 32})
    return build_mini_components(cfg, build_caption_tokenizer(CAPTIONS, model_max_length=16))


def latent():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def masks():
    m = np.zeros((2, 32, 32), bool)
    m[0, :, :14], m[1, :, 18:] = True, True
    return m


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.unet.named_parameters()},
            {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()})


def _changed(model, snap):
    u, t = snap
    # the embedding matrix grew by the identifier rows: compare the rows that existed before
    return ({n for n, p in model.unet.named_parameters() if not torch.equal(u[n], p)},
            {n for n, p in model.text_encoder.named_parameters() if not torch.equal(t[n], p[:len(t[n])])})


def _is_kv(name):
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def test_rare_words_are_the_last_learned_whole_words():
    model = tiny()
    vocab = model.tokenizer.get_vocab()
    words = rare_words(model.tokenizer, 2, exclude=CLASSES)
    whole = sorted(((i, t[:-4]) for t, i in vocab.items() if t.endswith("</w>") and t[:-4].isalpha() and len(t) > 5
                    and t[:-4] not in CLASSES), reverse=True)
    assert words == tuple(w for _, w in whole[:2]) and not set(words) & set(CLASSES)


def test_custom_diffusion_prompt_rare_init_and_kv_only():
    model = tiny()
    snap = _snapshot(model)
    res = custom_diffusion_finetune(model, latent(), CLASSES, CustomDiffusionConfig(steps=2, lr=1e-3, cross_res=(8,)))
    assert res.custom.prompt((0, 1)) == "a photo of <v1> circle and <v2> square"  # "[V1] [Class1] and [V2] [Class2]"
    assert res.custom.prompt((1,), "on a plain background") == "a photo of <v2> square on a plain background"
    rare = rare_words(model.tokenizer, 2, exclude=CLASSES)
    assert res.custom.tokens.init_words == rare
    emb = model.text_encoder.get_input_embeddings().weight
    for tid, w in zip(res.custom.tokens.ids, rare):
        assert torch.allclose(emb[tid], emb[model.tokenizer(w, add_special_tokens=False)["input_ids"]].mean(0))
    u, t = _changed(model, snap)
    assert u and all(_is_kv(n) for n in u) and not t


def test_disendiff_adds_calibration_on_the_same_setup():
    model = tiny()
    snap = _snapshot(model)
    res = disendiff_finetune(model, latent(), CLASSES, DisenDiffConfig(steps=2, lr=1e-3, cross_res=(8,)))
    assert res.custom.prompt((0, 1)) == "a photo of <v1> circle and <v2> square"
    assert all("calibration" in h for h in res.train.history)
    assert all(abs(h["loss"] - h["rec"] - h["calibration"]) < 1e-5 for h in res.train.history)
    u, t = _changed(model, snap)
    assert u and all(_is_kv(n) for n in u) and not t


def test_calibration_losses_hand_case():
    # 2x1 maps; token 1 (V1) at pixel 0, token 2 (class 1) identical → bind 0 for concept 1; V2 (3) = class 2 (4)
    maps = torch.zeros(1, 2, 1, 5)
    maps[0, 0, 0, 1] = maps[0, 0, 0, 2] = 1.0
    maps[0, 1, 0, 3] = maps[0, 1, 0, 4] = 1.0
    bind, sep = calibration_losses(maps, torch.tensor([[1, 3]]), torch.tensor([[2, 4]]), nu=2.0)
    assert float(bind) == 0.0 and float(sep) == 0.0  # disjoint maps: no overlap
    maps[0, 1, 0, 1] = 1.0  # V1 now covers both pixels: min-max makes it constant → 0 everywhere after normalising
    maps[0, 0, 0, 1] = 0.5  # V1 = [0.5, 1] → ^2 [0.25, 1] → normalised [0, 1] = V2's map → full overlap
    bind, sep = calibration_losses(maps, torch.tensor([[1, 3]]), torch.tensor([[2, 4]]), nu=2.0)
    assert float(sep) == pytest.approx(0.5)  # Σ min / Σ (a + b) = 1 / 2
    assert float(bind) == pytest.approx(((0 - 1) ** 2 + (1 - 0) ** 2) / 2 / 2)  # V1 vs class 1 = [1, 0]; mean over K


def test_break_a_scene_two_stages_masked_losses_and_prompt():
    model = tiny()
    snap = _snapshot(model)
    cfg = BreakASceneConfig(ti_steps=2, steps=0, cross_res=(8,))
    res = break_a_scene_finetune(model, latent(), CLASSES, masks(), cfg)
    assert res.custom.prompt((0, 1)) == "a photo of <v1> and <v2>"  # "[V1] and [V2]"
    assert res.custom.tokens.init_words == tuple(CLASSES)
    u, t = _changed(model, snap)
    emb_name = next(n for n, p in model.text_encoder.named_parameters() if p is model.text_encoder.get_input_embeddings().weight)
    assert not u and not t  # stage 1: no U-Net weight, no existing text-encoder weight changes
    emb = model.text_encoder.get_input_embeddings().weight
    init = [model.text_encoder.get_input_embeddings().weight[model.tokenizer(w, add_special_tokens=False)["input_ids"]].mean(0)
            for w in CLASSES]
    assert all(not torch.allclose(emb[i], v) for i, v in zip(res.custom.tokens.ids, init))  # the <v_i> rows trained
    old = snap[1][emb_name]
    rows = (model.text_encoder.get_input_embeddings().weight[:len(old)] != old).any(1).nonzero().flatten().tolist()
    assert rows == []  # the vocabulary's own rows never move: only the new <v_i> rows train
    assert all("attn" in h for h in res.train.history)

    model2 = tiny()
    snap2 = _snapshot(model2)
    res2 = break_a_scene_finetune(model2, latent(), CLASSES, masks(), BreakASceneConfig(ti_steps=1, steps=2, lr=1e-3,
                                                                                         cross_res=(8,)))
    u, t = _changed(model2, snap2)
    assert u and all(_is_kv(n) for n in u) and len(t) > 1  # stage 2: the text encoder and W_k/W_v
    assert [h["step"] for h in res2.train.history] == [1, 2, 3] and res2.extra["stage_steps"] == [1, 2]


def test_union_sampling_draws_every_subset():
    draw = union_sampler(2)
    rng = np.random.default_rng(0)
    seen = [draw(rng) for _ in range(3000)]
    freq = {s: seen.count(s) / len(seen) for s in set(seen)}
    assert set(freq) == {(0,), (1,), (0, 1)}
    assert freq[(0, 1)] == pytest.approx(0.5, abs=0.05) and freq[(0,)] == pytest.approx(0.25, abs=0.04)


def _trained(model):
    """The tensors Break-a-Scene's stage 2 trains: the text encoder and the cross-attention W_k/W_v."""
    return {**{f"te.{n}": p.detach().clone() for n, p in model.text_encoder.named_parameters()},
            **{n: p.detach().clone() for n, p in model.unet.named_parameters() if _is_kv(n)}}


def test_break_a_scene_without_textual_inversion_starts_stage_two_from_the_init_words():
    """§3.6.2 disables the textual-inversion phase: no stage-1 step in the history, and at stage-2 step 0 the
    identifier rows still hold their initialisation words' embeddings (a TI phase would have moved them)."""
    model = tiny()
    words = ("circle", "square triangle")  # the second: a mean of two words' embeddings (a "general" init)
    emb = model.text_encoder.get_input_embeddings().weight.detach().clone()  # before anything trains
    want = torch.stack([emb[model.tokenizer(w, add_special_tokens=False)["input_ids"]].mean(0) for w in words])
    seen = {}

    def look(step, m, custom):
        emb = m.text_encoder.get_input_embeddings().weight
        seen[step] = emb[list(custom.tokens.ids)].detach().clone()

    res = break_a_scene_finetune(model, latent(), CLASSES, masks(), BreakASceneConfig(ti_steps=0, steps=2, lr=1e-3, cross_res=(8,)),
                                 init_words=words, snapshot_every=1, on_snapshot=look)
    assert torch.allclose(seen[0], want)
    assert sorted(seen) == [0, 1, 2] and not torch.equal(seen[2], seen[0])  # stage 2 trains the whole text encoder
    assert [h["step"] for h in res.train.history] == [1, 2] and res.extra["stage_steps"] == [0, 2]


def test_break_a_scene_snapshot_at_step_k_is_a_separate_run_of_k_steps():
    """Chunked training (checkpoint/resume) is the uninterrupted run: the state seen at step 2 of a 3-step run equals
    a separate 2-step run's, and the 3-step end state and losses equal an unchunked 3-step run's."""
    cfg = dict(ti_steps=0, lr=1e-3, cross_res=(8,))
    states = {}
    chunked = tiny()
    res = break_a_scene_finetune(chunked, latent(), CLASSES, masks(), BreakASceneConfig(steps=3, **cfg), snapshot_every=2,
                                 on_snapshot=lambda k, m, c: states.__setitem__(k, _trained(m)))
    assert sorted(states) == [0, 2, 3]
    two, three = tiny(), tiny()
    break_a_scene_finetune(two, latent(), CLASSES, masks(), BreakASceneConfig(steps=2, **cfg))
    whole = break_a_scene_finetune(three, latent(), CLASSES, masks(), BreakASceneConfig(steps=3, **cfg))
    for name, value in _trained(two).items():
        assert torch.equal(states[2][name], value), name
    assert not all(torch.equal(states[0][n], v) for n, v in states[2].items())  # step 2 is not step 0
    for name, value in _trained(three).items():
        assert torch.equal(states[3][name], value), name
    assert [h["loss"] for h in res.train.history] == [h["loss"] for h in whole.train.history]
    assert all(torch.equal(res.state[k], whole.state[k]) for k in whole.state)
