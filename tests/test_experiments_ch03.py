"""Chapter 3's experiment module: profile settings, the ground-truth metrics by hand, the caches, and the chapter on smoke."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ctrlgen import paths
from ctrlgen.config import load_profile
from ctrlgen.data.worlds.multiconcept import COLOURS, SHAPES, held_out_combinations
from ctrlgen.experiments import ch03_attencraft as ch3
from ctrlgen.thesis.claims import RECORD_TABLE, load_ledger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path):
    return load_profile("smoke", {"paths.cache_root": str(tmp_path / "cache")})


def test_config_reads_the_thesis_values_in_full():
    cc = ch3.Ch3Config.from_profile(load_profile("full"))
    assert (cc.mask.nu, cc.mask.tau, cc.mask.gamma, cc.mask.t_max, cc.mask.n_top) == (2.0, 4.0, 0.1, 300, 5)
    assert cc.mask.score_timesteps == (0, 20, 40, 60, 80) and (cc.alpha, cc.omega) == (0.01, 0.3)
    assert cc.steps == {"Mine": 300, "CusDiff": 200, "DisenDiff": 250, "BAS": 200, "BAS-TI": 400}
    assert cc.lr == {"Mine": 1e-4, "CusDiff": 5e-5, "DisenDiff": 5e-5, "BAS": 5e-5} and cc.bas_ti_lr == 5e-4
    assert cc.sweep_lrs == (1e-5, 5e-5, 1e-4) and (cc.mask.cross_res, cc.mask.self_res) == (16, 32)
    assert len(cc.contexts) * cc.n_images == 100 and cc.num_steps == 50 and cc.guidance_scale == 7.5
    assert cc.scheduler == "pndm" and cc.n_datasets == 16 and cc.omegas == (0.1, 0.2, 0.4, 0.5)


def test_colour_share_by_hand():
    img = torch.zeros(1, 3, 2, 2)
    red = torch.tensor(COLOURS["red"], dtype=torch.float32) / 255
    img[0, :, 0, 0] = red            # full shade
    img[0, :, 0, 1] = red * 0.55     # textured shade
    img[0, :, 1, 0] = torch.tensor(COLOURS["blue"], dtype=torch.float32) / 255
    assert ch3.colour_share(img, "red").tolist() == [0.5]
    assert ch3.colour_share(img, "blue").tolist() == [0.25]


def test_sync_is_the_absolute_difference_of_the_concepts_mean_feat_i():
    per = pd.DataFrame({"scope": ["single"] * 4 + ["group"], "concept": ["0", "0", "1", "1", "0,1"],
                        "feat-I": [0.6, 0.8, 0.2, 0.4, 0.9]})
    assert ch3.sync(per) == pytest.approx(0.4)


def test_trial_settings_scale_steps_and_carry_variants():
    cc = ch3.Ch3Config.from_profile(load_profile("mini"))
    s = ch3.trial_settings(cc, "Mine", 5e-5, 0.5, omega=0.1)
    assert s == {"lr": 5e-5, "steps": round(cc.steps["Mine"] * 0.5), "omega": 0.1, "ratio_mode": "adaptive",
                 "rec_on_groups": False}
    assert ch3.trial_settings(cc, "BAS")["ti_steps"] == cc.steps["BAS-TI"] and ch3.trial_settings(cc, "BAS")["lr"] == 5e-5


def test_scenes_load_at_the_model_size_with_one_mask_per_concept(cfg):
    scenes = ch3.load_scenes(cfg, 2)
    size = int(cfg.models.image_size)
    assert len(scenes) == 2
    for s in scenes:
        assert s.image.shape == (size, size, 3) and s.masks.shape == (2, size, size) and s.masks.any((1, 2)).all()
        assert not (s.masks[0] & s.masks[1]).any() and all(c in COLOURS for c in s.colours)
    three = ch3.three_concept_scene(cfg)
    assert three.masks.shape[0] == 3 and three.masks.any((1, 2)).all()
    assert len(set(three.class_names)) == 3 and len(set(three.colours)) == 3
    same = ch3.same_class_scene(cfg)
    assert same.masks.shape[0] == 2 and same.masks.any((1, 2)).all() and not (same.masks[0] & same.masks[1]).any()
    assert len(set(same.class_names)) == 1 and len(set(same.colours)) == 2 and same.name == f"two {same.class_names[0]}s"


def test_limitation_scenes_are_held_out_instances_of_known_shapes():
    """Stage I reads the class names' cross-attention (§3.3.1): only shape words the base model was pretrained
    on localize, so the extra scenes hold known shapes, in triples held out of pretraining like the datasets."""
    for concepts in (ch3.THREE_CONCEPTS, ch3.SAME_CLASS_CONCEPTS):
        for c in concepts:
            assert c.shape in SHAPES and (c.shape, c.colour, c.texture) in held_out_combinations(), c


def test_the_chapter_runs_on_smoke_and_records_every_claim(tmp_path):
    env = {**os.environ, paths.ENV_CACHE: str(tmp_path / "cache"), paths.ENV_OUTPUT: str(tmp_path / "build")}
    result = subprocess.run([sys.executable, "-m", "ctrlgen.cli.main", "run", "ch03_attencraft", "--profile", "smoke"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    record = json.loads((tmp_path / "build" / "results" / "smoke" / "ch03_attencraft.json").read_text())
    held = record["metrics"].get(RECORD_TABLE, {})
    want = {c.id for c in load_ledger() if c.registers("ch03_attencraft")}
    assert want and want <= set(held)
    assert {"3.1", "3.2", "3.3", "3.6"} <= set(record["metrics"])


def test_token_attention_table_says_where_each_token_looks():
    """Hand case on a 4x4 map: concept 0's mask is the top-left 2x2, concept 1's the bottom-right 2x2. Token 0
    puts 0.5 on its mask and 0.1 elsewhere (localizes); token 1 puts 0.4 on the background and 0.2 on both masks
    (does not)."""
    from types import SimpleNamespace

    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = masks[1, 2:, 2:] = True
    cross = torch.full((2, 4, 4), 0.1)
    cross[0, :2, :2] = 0.5
    cross[1] = 0.4
    cross[1][torch.from_numpy(masks.any(0))] = 0.2
    scene = ch3.Scene("01_a_and_b", np.zeros((4, 4, 3), np.uint8), masks, ("circle", "square"), ("red", "blue"))
    table = ch3.token_attention_table([scene], {"selfattn": [{"stage": SimpleNamespace(cross=cross)}]})
    row0, row1 = table.loc[("selfattn", "01_a_and_b", "circle")], table.loc[("selfattn", "01_a_and_b", "square")]
    assert (row0["own mask"], row0["other concepts"], row0["background"]) == pytest.approx((0.5, 0.1, 0.1))
    assert bool(row0["localizes"]) and not bool(row1["localizes"])
    assert (row1["own mask"], row1["other concepts"], row1["background"]) == pytest.approx((0.2, 0.2, 0.4))


# ---------------------------------------------------------------- §3.6.2 preliminary experiment (Fig. 3.4, Table 3.5)
def test_preliminary_settings_are_the_thesis_values_in_full_and_g_is_the_worlds_shape_words():
    full = ch3.Ch3Config.from_profile(load_profile("full"))
    assert full.preliminary == ch3.PreliminarySettings(steps=1000, eval_every=100, lr=5e-5, n_datasets=10)
    assert full.general_word == "shape" and ch3.turn_step(full) == 300
    for name in ("mini", "smoke"):
        cc = ch3.Ch3Config.from_profile(load_profile(name))
        assert tuple(cc.general_word.split()) == SHAPES, name  # G: the mean of the world's shape words
        p = cc.preliminary
        assert 0 < ch3.turn_step(cc) < p.steps and (ch3.turn_step(cc) % p.eval_every == 0), name
    with pytest.raises(ValueError, match="eval_every"):
        ch3.PreliminarySettings(steps=10, eval_every=0, lr=1e-4, n_datasets=1)


def test_patterns_map_per_concept_as_the_thesis_footnote_says():
    """§3.3.2's footnote: "cat-dog", "cat-animal", "animal-dog" are P-P, P-G, G-P for "cat" and P-P, G-P, P-G for "dog"."""
    scene = ch3.Scene("cat & dog", np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 2), bool), ("cat", "dog"), ("red", "blue"))
    words = ch3.pattern_words(scene, "animal")
    assert [words[p] for p in ch3.PATTERNS] == [("cat", "dog"), ("cat", "animal"), ("animal", "dog")]  # Table 3.4's row
    assert [ch3.concept_pattern(p, 0) for p in ch3.PATTERNS] == ["P-P", "P-G", "G-P"]
    assert [ch3.concept_pattern(p, 1) for p in ch3.PATTERNS] == ["P-P", "G-P", "P-G"]


def _hand_curves():
    """Two concepts of one dataset, three trainings, steps 0/10/20, two samples each; feat-I = 10·(training index) +
    step/10 + image/10 for concept a and minus that for concept b; score = 100·(training index) + concept index."""
    rows = []
    for t_i, training in enumerate(ch3.PATTERNS):
        for step in (0, 10, 20):
            for k, concept in enumerate(("a", "b")):
                for j in range(2):
                    v = (10 * t_i + step / 10 + j / 10) * (1 if k == 0 else -1)
                    rows.append({"dataset": "d", "concept": concept, "training": training,
                                 "pattern": ch3.concept_pattern(training, k), "step": step, "image": j, "feat-I": v,
                                 "score": 100 * t_i + k})
    return pd.DataFrame(rows)


def test_init_claims_and_table_by_hand(cfg):
    """Hand case: the pairs each claim compares, read off the constructed values (see ``_hand_curves``)."""
    cc = ch3.Ch3Config.from_profile(cfg)
    cc = ch3.replace(cc, preliminary=ch3.PreliminarySettings(steps=20, eval_every=10, lr=1e-4, n_datasets=1))
    assert ch3.turn_step(cc) == 10  # nearest evaluated step to 0.3 · 20 = 6
    c = ch3.init_claims(_hand_curves(), "feat-I", cc)
    # step 0, P-P vs G-P from each concept's view: concept a P-P = training P-P (0), G-P = training G-P (index 2);
    # concept b P-P = training P-P, G-P = training P-G (index 1); samples j = 0, 1; rows sorted by (dataset, concept, image)
    np.testing.assert_allclose(c["start"][0], [0, 0.1, 0, -0.1])
    np.testing.assert_allclose(c["start"][1], [20, 20.1, -10, -10.1])
    a, b = c["p_degrades"]  # P at step 10 vs step 20: always 1 apart (×sign), paired per sample and pattern
    assert len(a) == 8 and np.allclose(b - a, [1, 1, 1, 1, -1, -1, -1, -1])
    a, b = c["g_improves"]  # G-P at 20 vs 10
    assert len(a) == 4 and np.allclose(a - b, [1, 1, -1, -1])
    other, own = c["other_init"]  # |P-P − P-G| and |P-P − G-P| at steps 10, 20: a: 10 and 20; b: 20 and 10
    assert len(other) == 8 and sorted(set(np.round(other, 6))) == [10, 20] and np.allclose(other + own, 30)
    np.testing.assert_allclose(c["score_start"][0], [0, 1])  # concept a, b under P-P
    np.testing.assert_allclose(c["score_start"][1], [200, 101])  # a under training G-P, b under training P-G
    t35 = ch3.init_table(_hand_curves())
    assert list(t35.columns) == list(ch3.PATTERNS) and list(t35.index) == [("d", "a"), ("d", "b")]
    assert t35.loc[("d", "b")].tolist() == [1, 101, 201]
    table = ch3.curve_table(_hand_curves(), "feat-I")
    assert table.loc[("d", "a", "G-P", 20), "feat-I"] == pytest.approx(22.05)


def _tiny_base(cfg):
    from ctrlgen.models import build_caption_tokenizer, build_mini_components

    captions = [f"a photo of a red {s} and a blue {t} on a plain background" for s in SHAPES for t in SHAPES]
    return build_mini_components(cfg, build_caption_tokenizer(captions, model_max_length=24))


def test_init_curve_starts_at_table_3_5s_scores_and_is_cached(cfg, monkeypatch):
    """One training of Fig. 3.4 on a tiny model: evaluations at 0, eval_every, ..., steps; its step-0 Eq. (3.4) scores
    are ``init_scores`` (an independent path: no training code); a second call reads the cache (no training)."""
    monkeypatch.setattr(ch3, "base_key", lambda cfg, variant=None: "tiny test model")
    base = _tiny_base(cfg)
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 4:16, 4:16], masks[1, 18:30, 18:30] = True, True
    image = np.zeros((32, 32, 3), np.uint8)
    image[masks[0]], image[masks[1]] = COLOURS["red"], COLOURS["blue"]
    scene = ch3.Scene("01_circle_and_square", image, masks, ("circle", "square"), ("red", "blue"))
    cc = ch3.replace(ch3.Ch3Config.from_profile(cfg),
                     preliminary=ch3.PreliminarySettings(steps=3, eval_every=2, lr=1e-3, n_datasets=1))
    mean_rgb = lambda x: x.mean((2, 3))  # noqa: E731 (a stand-in image feature)
    ex = ch3.Extractors(mean_rgb, mean_rgb, None, "feat-I", "cls-I", "mean colour")
    r = ch3.init_curve(cfg, base, scene, "G-P", cc, ex)
    n = len(cc.contexts) * cc.n_images
    assert r["step"].tolist() == [0, 2, 3] and r["image"].shape == (3, 2, n) and r["score"].shape == (3, 2)
    assert [h["step"] for h in r["history"]] == [1, 2, 3]
    want = ch3.init_scores(base, scene, cc, cc.general_word)["G-P"]
    np.testing.assert_allclose(r["score"][0].numpy(), want, rtol=1e-6)
    assert not torch.equal(r["score"][0], r["score"][-1])  # training moved the attention
    monkeypatch.setattr(ch3, "_curve_now", lambda *a: pytest.fail("retrained despite the cache"))
    again = ch3.init_curve(cfg, base, scene, "G-P", cc, ex)
    assert torch.equal(again["image"], r["image"])
