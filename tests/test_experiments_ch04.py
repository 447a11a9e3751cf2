"""Chapter 4's experiment package: typed settings, the prompt pool, evaluation resizing, the finetuning settings
handed to the methods, and the content-keyed caches of samples, pairs and the evaluation segmenter."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlgen.config import load_profile
from ctrlgen.experiments import ch04_didgen
from ctrlgen.experiments.ch04_didgen import models as ch04_models
from ctrlgen.methods.didgen import PairConfig, PairResult


@pytest.fixture
def cfg(tmp_path):
    return load_profile("smoke", {"paths.cache_root": str(tmp_path / "cache")})


@pytest.fixture
def ec(cfg):
    return ch04_didgen.EvalConfig.from_profile(cfg)


# --------------------------------------------------------------------------- settings
def test_eval_config_reads_the_profile_with_types(cfg, ec):
    e = cfg.didgen.eval
    assert ec.eval_size == e.eval_size == 32 and isinstance(ec.eval_size, int)
    assert ec.n_new_prompts == cfg.didgen.dermprompt.n_new_prompts
    assert ec.segmenter_channels == tuple(e.segmenter_channels) and isinstance(ec.segmenter_lr, float)
    assert ec.cross_res == cfg.attention.cross_res[0] and ec.seed == cfg.seed
    assert ec.n_figure_maps == max(1, e.n_figure // 2)


def test_prompt_pool_is_cycled_in_order_and_rows_have_n_prompts(ec):
    pool = ["p0", "p1", "p2"]
    rows = ch04_didgen.table_4_1_prompts(replace(ec, n_samples=7), pool)
    assert rows["Mine-DermPrompt"] == ["p0", "p1", "p2", "p0", "p1", "p2", "p0"]
    assert rows["Mine-prefix"] == [ec.prefix] * 7 and rows["DreamBooth"] == [ec.baseline_prompt] * 7
    assert ch04_didgen.table_4_1_prompts(ec, pool, n=2)["Mine-DermPrompt"] == ["p0", "p1"]


# --------------------------------------------------------------------------- §4.7.2 evaluation size
def test_eval_resize_is_identity_at_the_eval_size():
    x = torch.rand(2, 3, 16, 16)
    assert ch04_didgen.eval_resize(x, 16) is x


def test_eval_resize_matches_pil_bilinear_with_antialiasing():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for size in (16, 48):  # down (antialiased) and up
        ours = ch04_didgen.eval_resize(x, size)[0].permute(1, 2, 0).numpy()
        pil = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), np.float32) / 255
        assert ours.shape == (size, size, 3)
        assert np.abs(ours - pil).mean() < 2 / 255 and np.abs(ours - pil).max() < 12 / 255


def test_quality_row_measures_at_the_eval_size(ec, monkeypatch):
    seen = []
    monkeypatch.setattr(ch04_didgen, "fid", lambda real, fake, f: seen.append((real.shape, fake.shape)) or 0.0)
    monkeypatch.setattr(ch04_didgen, "ms_ssim_between", lambda a, b, *args: seen.append((a.shape, b.shape)) or 0.0)
    monkeypatch.setattr(ch04_didgen, "within_set_diversity", lambda a, *args: seen.append((a.shape,)) or 0.0)
    ch04_didgen.quality_row(torch.rand(3, 3, 16, 16), torch.rand(4, 3, 24, 24), None, None, replace(ec, eval_size=8))
    assert {s[-2:] for shapes in seen for s in shapes} == {(8, 8)}


# --------------------------------------------------------------------------- finetuning settings
def _sets(n=4, side=8):
    rng = np.random.default_rng(0)
    return SimpleNamespace(train_images=rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
                           train_masks=rng.uniform(size=(n, side, side)) > 0.5, prompts=["An image of <lesion> on <skin>"] * n,
                           fingerprint="test-data")


def test_baselines_get_the_profile_adamw_betas_and_eps(cfg, monkeypatch, tmp_path):
    got = {}
    monkeypatch.setattr(ch04_models, "sd_finetune", lambda model, images, prompt, **kw: got.update(kw) or SimpleNamespace(history=[]))
    cfg = load_profile("smoke", {"didgen.finetune.adam_betas": [0.8, 0.95], "didgen.finetune.adam_eps": 1e-6})
    ch04_models._train(cfg, "sd-finetune", None, _sets(), tmp_path, False)
    assert got["adam_betas"] == (0.8, 0.95) and got["adam_eps"] == 1e-6


def test_p_tokens_start_from_the_profile_words(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(ch04_models, "setup_placeholders", lambda model, tokens, words: calls.update(tokens=tokens, words=words) or "toks")
    monkeypatch.setattr(ch04_models, "region_aware_finetune",
                        lambda *a, tokens=None, **kw: calls.update(passed=tokens) or (SimpleNamespace(history=[]), tokens))
    cfg = load_profile("smoke", {"didgen.placeholder_init": ["mole", "skin"]})
    ch04_models._train(cfg, "mine", None, _sets(), tmp_path, False)
    assert calls == {"tokens": ("<lesion>", "<skin>"), "words": ("mole", "skin"), "passed": "toks"}


def test_model_key_changes_with_the_placeholder_words():
    sets = _sets()
    a, _ = ch04_models._key(load_profile("smoke"), "mine", "base", sets)
    b, _ = ch04_models._key(load_profile("smoke", {"didgen.placeholder_init": ["mole", "skin"]}), "mine", "base", sets)
    assert a != b


def test_a_training_seed_replicate_has_its_own_key():
    sets, cfg = _sets(), load_profile("smoke")
    main, parts = ch04_models._key(cfg, "mine", "base", sets)
    assert ch04_models._key(cfg, "mine", "base", sets, seed=cfg.seed)[0] == main and parts["seed"] == cfg.seed
    assert ch04_models._key(cfg, "mine", "base", sets, seed=cfg.seed + 1)[0] != main


def test_code_files_exist_and_cover_the_flip_augmentation():
    lib = Path(ch04_models.__file__).resolve().parents[2]
    assert "training/augment.py" in ch04_models.CODE_FILES
    assert all((lib / f).is_file() for f in ch04_models.CODE_FILES)


# --------------------------------------------------------------------------- content-keyed caches
def test_samples_are_cached_by_model_key_and_settings(cfg, ec, monkeypatch):
    calls = []

    def fake_sample(model, prompts, num_steps, guidance_scale, seed=0):
        calls.append(num_steps)
        return torch.full((len(prompts), 3, 4, 4), float(num_steps) / 100)

    monkeypatch.setattr(ch04_didgen, "sample_images", fake_sample)
    ft = SimpleNamespace(key="model-a", model=None)
    first = ch04_didgen.cached_samples(ft, ["a", "b"], ec, cfg)
    again = ch04_didgen.cached_samples(ft, ["a", "b"], ec, cfg)
    assert calls == [ec.num_steps] and torch.equal(first, again)
    changed = ch04_didgen.cached_samples(ft, ["a", "b"], replace(ec, num_steps=ec.num_steps + 1), cfg)
    assert calls == [ec.num_steps, ec.num_steps + 1] and not torch.equal(changed, first)
    ch04_didgen.cached_samples(SimpleNamespace(key="model-b", model=None), ["a", "b"], ec, cfg)
    ch04_didgen.cached_samples(ft, ["a", "c"], ec, cfg)
    assert len(calls) == 4


def _fake_pairs(n, side=8):
    g = torch.Generator().manual_seed(n)
    return {"images": torch.rand(n, 3, side, side, generator=g), "masks": torch.rand(n, side, side, generator=g) > 0.5,
            "masks_tau0": torch.zeros(n, side, side, dtype=torch.bool), "cond_masks": torch.ones(n, side, side, dtype=torch.bool),
            "ok": torch.ones(n, dtype=torch.bool), "fallback": torch.zeros(n, dtype=torch.bool), "failure": [""] * n,
            "failure_tau": ["constant map"] + [""] * (n - 1), "prompts": [f"p{i}" for i in range(n)],
            "cross_maps": torch.rand(n, 2, 2, generator=g), "a_cs": torch.rand(n, side, side, generator=g),
            "history": [{"step": 0.0, "loss": 1.5}], "seconds": 2.0 * n}


def test_pair_runs_are_cached_and_rebuilt_as_pair_results(cfg, ec, monkeypatch):
    calls = []
    monkeypatch.setattr(ch04_didgen, "_generate_pairs",
                        lambda model, config, masks, prompts, seed, batch, progress=False: calls.append(config) or _fake_pairs(len(masks)))
    ft = SimpleNamespace(key="mine-key", model=None)
    config = PairConfig.from_profile(cfg)
    cond = np.zeros((3, 8, 8), bool)
    first = ch04_didgen.run_pairs(ft, config, cond, ["a", "b", "c"], "guided", ec, cfg)
    again = ch04_didgen.run_pairs(ft, config, cond, ["a", "b", "c"], "guided", ec, cfg)
    assert len(calls) == 1 and isinstance(again.result, PairResult)
    assert torch.equal(first.result.images, again.result.images) and again.result.failure_tau[0] == "constant map"
    assert again.result.history == [{"step": 0.0, "loss": 1.5}] and again.seconds_per_pair == pytest.approx(2.0)
    ch04_didgen.run_pairs(ft, replace(config, use_ca=False), cond, ["a", "b", "c"], "w/o CA", ec, cfg)
    ch04_didgen.run_pairs(ft, config, cond | np.eye(8, dtype=bool), ["a", "b", "c"], "guided", ec, cfg)
    assert len(calls) == 3 and calls[1].use_ca is False


def test_pair_iou_is_per_pair_and_two_empty_masks_agree():
    r = PairResult(**{k: v for k, v in _fake_pairs(2).items() if k != "seconds"})
    r.masks[0], r.cond_masks[0] = False, False  # both empty: IoU 1 (metrics.overlap)
    r.masks[1] = False
    r.masks[1, :2, :] = True  # 16 of 64 condition pixels
    run = ch04_didgen.PairRun("x", r, 1.0)
    assert ch04_didgen.pair_iou(run).tolist() == pytest.approx([1.0, 0.25])


def test_evaluation_segmenter_is_cached_as_weights(cfg, ec, monkeypatch):
    calls = []
    real_train = ch04_didgen.train_segmenter

    def counting(*args, **kw):
        calls.append(args[2])
        return real_train(*args, **kw)

    monkeypatch.setattr(ch04_didgen, "train_segmenter", counting)
    sets = _sets(n=6, side=16)
    small = replace(ec, segmenter_steps=2, segmenter_batch=2, segmenter_channels=(4, 8))
    first = ch04_didgen.evaluation_segmenter(sets, small, cfg)
    again = ch04_didgen.evaluation_segmenter(sets, small, cfg)
    assert calls == [2]
    x = ch04_didgen.pixels01(sets.train_images)
    assert np.array_equal(first.predict(x), again.predict(x)) and again.history == pytest.approx(first.history)
    for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values()):
        assert torch.equal(a, b)
    ch04_didgen.evaluation_segmenter(sets, replace(small, segmenter_steps=3), cfg)
    assert calls == [2, 3]
