"""Chapter 2's word-localization rows (issue 12 / 16): the localization ratio of a token's cross-attention map
on the object its word names, the scenes caption -> region mapping, and a run on a tiny scenes model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ctrlgen.analysis.cross_attention import WordRegion, localization_ratio, region_shares, word_localization_table
from ctrlgen.analysis.quality_bar import affinity_criterion, bar_table, failures, info_rows
from ctrlgen.config import load_profile
from ctrlgen.data.worlds.multiconcept import Concept, scene_caption
from ctrlgen.experiments import base_models as P
from ctrlgen.experiments.base_models.bar import LOCALIZATION, localization_rows
from ctrlgen.experiments.base_models.measure_words import scene_word_regions, word_localization
from ctrlgen.models.tokenizer import build_caption_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TWO = scene_caption([Concept("circle", "red", "striped"), Concept("square", "blue", "plain")], "plain")
THREE = scene_caption([Concept("ring", "green", "plain"), Concept("diamond", "white", "striped"),
                       Concept("cross", "black", "plain")], "gradient")


# ---- the ratio ---------------------------------------------------------------------------------------------

def test_ratio_by_hand_on_a_4x4_map():
    """Region = top-left 2x2 of a 4x4 map (area share 4/16); the map puts 0.6 of its mass there: 0.6 / 0.25 = 2.4,
    whatever the map's scale."""
    shares = torch.zeros(1, 4, 4)
    shares[0, :2, :2] = 1
    m = torch.full((1, 4, 4), 0.4 / 12)
    m[0, :2, :2] = 0.15
    assert localization_ratio(m, shares).item() == pytest.approx(2.4)
    assert localization_ratio(7 * m, shares).item() == pytest.approx(2.4)
    # all mass inside: 1 / area share
    inside = shares.clone()
    assert localization_ratio(inside, shares).item() == pytest.approx(4.0)


def test_uniform_map_scores_exactly_one():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, 8, 8), generator=gen)
    labels[:, 0, 0] = 1  # region 1 present in both images
    for side in (8, 4):
        shares = region_shares(labels, 1, side)
        ratio = localization_ratio(torch.ones(2, side, side), shares)
        assert torch.allclose(ratio, torch.ones(2, dtype=ratio.dtype), atol=1e-12)


def test_region_shares_area_average_by_hand():
    """An 8x8 label map with region 1 on its top-left 3x3 block, at a 4x4 map: pixel (0,0) is covered fully,
    (0,1) and (1,0) half, (1,1) a quarter; a map all on pixel (0,0) scores 1 / (9/64) = 64/9."""
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :3, :3] = 1
    shares = region_shares(labels, 1, 4)
    expected = torch.zeros(4, 4)
    expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1, 0.5, 0.5, 0.25
    assert torch.equal(shares[0], expected)
    peak = torch.zeros(1, 4, 4)
    peak[0, 0, 0] = 1
    assert localization_ratio(peak, shares).item() == pytest.approx(64 / 9)


def test_undefined_ratio_is_refused():
    with pytest.raises(ValueError, match="region without pixels"):
        localization_ratio(torch.ones(1, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        localization_ratio(torch.ones(4, 4), torch.ones(4, 4))


# ---- the caption -> region mapping -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return build_caption_tokenizer([TWO, THREE, scene_caption([Concept("triangle", "yellow", "plain")], "field")],
                                   model_max_length=32)


def _ids(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids


def test_scene_captions_map_words_to_objects_left_to_right(tokenizer):
    two, three = scene_word_regions(tokenizer, _ids(tokenizer, [TWO, THREE]), n_objects=[2, 3])
    # "<s> a photo of a red striped circle and a blue square ..." (one token per word)
    assert two == [WordRegion(5, 1, "colour", "red"), WordRegion(7, 1, "shape", "circle"),
                   WordRegion(10, 2, "colour", "blue"), WordRegion(11, 2, "shape", "square")]
    # "<s> a photo of a green ring and a white striped diamond and a black cross on a gradient background"
    assert three == [WordRegion(5, 1, "colour", "green"), WordRegion(6, 1, "shape", "ring"),
                     WordRegion(9, 2, "colour", "white"), WordRegion(11, 2, "shape", "diamond"),
                     WordRegion(14, 3, "colour", "black"), WordRegion(15, 3, "shape", "cross")]


def test_scene_caption_errors_name_the_caption(tokenizer):
    with pytest.raises(ValueError, match="names 2 objects, its image has 3"):
        scene_word_regions(tokenizer, _ids(tokenizer, [TWO]), n_objects=[3])
    with pytest.raises(ValueError, match="2 colour words"):
        scene_word_regions(tokenizer, _ids(tokenizer, ["a photo of a red blue circle on a plain background"]))
    with pytest.raises(ValueError, match="names no shape"):
        scene_word_regions(tokenizer, _ids(tokenizer, ["a photo of a red circle and a blue on a plain background"]))


# ---- info rows in the bar -----------------------------------------------------------------------------------

def test_info_rows_are_reported_but_never_fail():
    info = info_rows("cross-attention localization (info)", {"shape words": 1.8, "colour words": 2.6},
                     n_tokens={"shape words": 10, "colour words": 10})
    table = bar_table(affinity_criterion(1.2, 1.3), info)
    assert list(table["status"]) == ["fail", "info", "info"]
    assert table["threshold"].iloc[1:].isna().all() and table["margin"].iloc[1:].isna().all()
    assert list(table["n_tokens"].iloc[1:]) == [10, 10]
    assert len(failures(table)) == 1 and failures(table)[0].startswith("self-attention affinity")


def test_localization_rows_one_per_kind():
    table = pd.DataFrame([{"kind": "colour", "word": "all", "localization_ratio": 2.0, "median": 1.5, "n_tokens": 4, "n_images": 2},
                          {"kind": "colour", "word": "red", "localization_ratio": 2.0, "median": 1.5, "n_tokens": 4, "n_images": 2},
                          {"kind": "shape", "word": "all", "localization_ratio": 1.5, "median": 1.25, "n_tokens": 4, "n_images": 2}])
    rows = localization_rows(table)
    assert list(rows["quantity"]) == ["shape words", "colour words"]
    assert list(rows["value"]) == [1.5, 2.0] and list(rows["median"]) == [1.25, 1.5]
    assert set(rows["criterion"]) == {LOCALIZATION} and set(rows["status"]) == {"info"}


# ---- one run on a tiny scenes model -------------------------------------------------------------------------

TINY = {"pretrain.max_train": 6, "pretrain.n_heldout": 3, "pretrain.vae.steps": 2, "pretrain.vae.batch_size": 2,
        "pretrain.unet.steps": 2, "pretrain.unet.plain_steps": 2, "pretrain.unet.batch_size": 2,
        "pretrain.unet.checkpoint_every": 2, "pretrain.measure.n_samples": 1, "pretrain.measure.sample_steps": 1}


def test_word_localization_on_a_smoke_scenes_model(isolated_cache):
    cfg = load_profile("smoke", TINY)
    P.pretrain_domain(cfg, "scenes", True, progress=False)
    data = P.load_domain_data(cfg, "scenes")
    model = P.load_variant(cfg, "scenes", "selfattn")
    table = word_localization(cfg, model, data)
    n_objects = int(sum(r.max() for r in data.heldout_regions))
    every = table[table["word"] == "all"].set_index("kind")
    assert set(every.index) == {"shape", "colour"}
    assert (every["n_tokens"] == n_objects).all() and (every["n_images"] == len(data.heldout_regions)).all()
    assert np.isfinite(table["localization_ratio"]).all() and (table["localization_ratio"] > 0).all()
    for kind, group in table[table["word"] != "all"].groupby("kind"):  # per-word rows partition the kind
        assert group["n_tokens"].sum() == every.loc[kind, "n_tokens"]
        weighted = (group["localization_ratio"] * group["n_tokens"]).sum() / group["n_tokens"].sum()
        assert weighted == pytest.approx(every.loc[kind, "localization_ratio"])
    # keys of zero make every cross-attention row uniform over the tokens, so every token map is uniform over
    # the pixels: the whole pipeline (capture, token positions, region shares) must then give exactly 1
    with torch.no_grad():
        for name, module in model.unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.zero_()
    flat = word_localization(cfg, model, data)
    assert np.allclose(flat["localization_ratio"], 1.0, atol=1e-6) and np.allclose(flat["median"], 1.0, atol=1e-6)
    # derm names no per-object region: not measured
    assert word_localization(cfg, model, P.load_domain_data(cfg, "derm")) is None


def test_table_refuses_a_word_naming_an_absent_region():
    class _Model:  # the checks run before any model call
        pass

    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="names region 2, absent"):
        word_localization_table(_Model(), torch.zeros(1, 4, 4, 4), torch.zeros(1, 8, dtype=torch.long), labels,
                                [[WordRegion(1, 2, "shape", "circle")]])
    with pytest.raises(ValueError, match="one entry per latent"):
        word_localization_table(_Model(), torch.zeros(2, 4, 4, 4), torch.zeros(2, 8, dtype=torch.long), labels,
                                [[WordRegion(1, 0, "shape", "circle")]])


def test_scenes_bar_carries_the_info_rows(isolated_cache):
    """Through ``model_bar`` (measured, stored as JSON, read back): one info row per kind, no threshold."""
    from ctrlgen.experiments.base_models import bar

    cfg = load_profile("smoke", {**TINY, "pretrain.quality_bar.classifier_steps": 2, "pretrain.quality_bar.classifier_batch": 4,
                                 "pretrain.quality_bar.n_samples": 3, "pretrain.quality_bar.sample_steps": 1})
    res = P.pretrain_domain(cfg, "scenes", True, progress=False)
    data = P.load_domain_data(cfg, "scenes")
    table = bar.model_bar(cfg, P.load_variant(cfg, "scenes", "selfattn"), res.key, data, "selfattn")
    info = table[table["status"] == "info"]
    assert list(info["quantity"]) == ["shape words", "colour words"] and set(info["criterion"]) == {LOCALIZATION}
    assert np.isfinite(info["value"]).all() and info["threshold"].isna().all()
    assert all(not line.startswith(LOCALIZATION) for line in failures(table))
