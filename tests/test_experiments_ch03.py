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
