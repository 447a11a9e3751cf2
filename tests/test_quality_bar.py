"""The base models' quality bar (issue 12): caption parsers, the attribute classifier and the four criteria,
against hand-written captions, hand-computed cases, closed forms and scikit-learn."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ctrlgen.analysis.attribute_labels import (CLASS, MULTI, Attribute, AttributeSchema, attribute_schema,
                                               caption_labels, label_counts, parse_caption, parse_cxr_caption,
                                               parse_derm_caption, parse_scenes_caption)
from ctrlgen.analysis.quality import sample_distance
from ctrlgen.analysis.quality_bar import (AttributeClassifier, _class_score, affinity_criterion, bar_table, chance_corrected_ratio, distance_criterion,
                                          failures, gaussian_ceiling_images, macro_auroc, majority_rate,
                                          prompt_fidelity_criterion, score, train_attribute_classifier, vae_criterion)
from ctrlgen.data.domains import cxr_caption, derm_captions
from ctrlgen.data.worlds.multiconcept import Concept, render_scene

# ------------------------------------------------------------------------------------------ caption parsers


def test_derm_parser_every_class_and_the_generator_s_own_captions():
    assert parse_derm_caption("an image of a small dark <lesion> on <skin>") == {"size": "small", "contrast": "dark"}
    assert parse_derm_caption("an image of a large faint <lesion> on <skin>") == {"size": "large", "contrast": "faint"}
    assert parse_caption("derm", "an image of a medium faint <lesion> on <skin>")["size"] == "medium"
    # captions written by the data layer itself: a dark lesion on light skin (large ITA difference), and a
    # lesion the colour of the skin (difference 0 -> faint); areas 16/64 and 4/64 against cuts 0.1 / 0.2
    skin = np.full((2, 8, 8, 3), (230, 190, 170), np.uint8)
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:6, 2:6], masks[1, 3:5, 3:5] = True, True
    skin[0][masks[0]] = (60, 30, 20)
    caps = derm_captions(skin, masks, area_cuts=(0.1, 0.2), low_contrast=30.0)
    assert [parse_derm_caption(c) for c in caps] == [{"size": "large", "contrast": "dark"},
                                                    {"size": "small", "contrast": "faint"}]


@pytest.mark.parametrize("bad", ["an image of a huge dark <lesion> on <skin>",       # unknown size
                                 "an image of a small pale <lesion> on <skin>",       # unknown contrast
                                 "an image of a small dark lesion on skin",           # the tokens are missing
                                 "a photo of a red circle and a blue square on a plain background"])
def test_derm_parser_refuses_other_captions_quoting_them(bad):
    with pytest.raises(ValueError, match="cannot read the derm caption") as err:
        parse_derm_caption(bad)
    assert repr(bad) in str(err.value)


def test_scenes_parser_two_and_three_objects_with_and_without_texture():
    two = parse_scenes_caption("a photo of a red cross and a orange striped square on a gradient background")
    assert two == {"objects": "2", "shapes": frozenset({"cross", "square"}), "colours": frozenset({"red", "orange"})}
    three = parse_scenes_caption(
        "a photo of a blue striped ring and a blue circle and a white striped triangle on a field background")
    assert three == {"objects": "3", "shapes": frozenset({"ring", "circle", "triangle"}),
                     "colours": frozenset({"blue", "white"})}  # two blue objects: the colour set has two members
    # "an" is read like "a"; the background word "plain" is not taken for a texture
    assert parse_scenes_caption("a photo of an orange ring and a black circle on a plain background")["shapes"] == \
        frozenset({"ring", "circle"})
    with pytest.raises(ValueError, match="shape 'star' of 'an orange star' is not one of"):
        parse_scenes_caption("a photo of an orange star and a black circle on a plain background")
    # the world's own renderer: a plain (texture-less) object, a textured one, a third one
    concepts = [Concept("diamond", "green", "plain"), Concept("cross", "yellow", "striped"), Concept("ring", "red", "striped")]
    _, _, caption = render_scene(concepts, 16, np.random.default_rng(0), "field")
    assert caption == "a photo of a green diamond and a yellow striped cross and a red striped ring on a field background"
    assert parse_scenes_caption(caption) == {"objects": "3", "shapes": frozenset({"diamond", "cross", "ring"}),
                                             "colours": frozenset({"green", "yellow", "red"})}


@pytest.mark.parametrize("bad", ["a photo of a pink circle and a blue square on a plain background",  # colour
                                 "a photo of a red blob and a blue square on a plain background",     # shape
                                 "a photo of a red plain circle and a blue square on a plain background",
                                 "a photo of a red wavy circle on a plain background",                # texture
                                 "a photo of a red dotted circle on a plain background",              # dropped (issue 12)
                                 "a photo of a red circle and a blue square on a noise background",   # dropped (issue 12)
                                 "a photo of a red circle and a blue square on a marble background",
                                 "a photo of a red circle and a blue square",                          # no background
                                 "a photo of red circle and a blue square on a plain background"])    # article
def test_scenes_parser_refuses_other_captions_quoting_them(bad):
    with pytest.raises(ValueError, match="cannot read the scenes caption") as err:
        parse_scenes_caption(bad)
    assert repr(bad) in str(err.value)


def test_cxr_parser_no_finding_one_several_and_the_data_layer_s_captions():
    assert parse_cxr_caption("a chest x-ray with no finding") == {"findings": frozenset()}
    assert parse_cxr_caption("a chest x-ray with cardiomegaly") == {"findings": frozenset({"cardiomegaly"})}
    assert parse_cxr_caption("a chest x-ray with pleural thickening and effusion and support devices") == \
        {"findings": frozenset({"pleural thickening", "effusion", "support devices"})}
    # NIH labels (with "_"), CheXpert labels (with spaces, uncertain -1 is not positive), and all-negative rows
    nih = cxr_caption({"Effusion": 1.0, "Pleural_Thickening": 1.0, "Mass": 0.0})
    chexpert = cxr_caption({"No Finding": 0.0, "Lung Opacity": 1.0, "Edema": -1.0, "Enlarged Cardiomediastinum": 1.0})
    negative = cxr_caption({"No Finding": 1.0, "Atelectasis": 0.0})
    assert parse_cxr_caption(nih)["findings"] == {"effusion", "pleural thickening"}
    assert parse_cxr_caption(chexpert)["findings"] == {"lung opacity", "enlarged cardiomediastinum"}
    assert parse_cxr_caption(negative)["findings"] == frozenset()


@pytest.mark.parametrize("bad", ["a chest x-ray with a broken heart", "a chest x-ray with effusion and effusion",
                                 "a chest radiograph with effusion", "a chest x-ray with ", 42])
def test_cxr_parser_refuses_other_captions(bad):
    with pytest.raises(ValueError, match="cxr caption") as err:
        parse_cxr_caption(bad)
    assert repr(bad) in str(err.value)


def test_unknown_domain_is_refused():
    with pytest.raises(ValueError, match="unknown domain 'faces'"):
        parse_caption("faces", "a face")


def test_schema_restricts_to_occurring_values_and_encodes_by_hand():
    caps = ["a photo of a red cross and a blue circle on a plain background",
            "a photo of a red ring and a white striped circle and a blue square on a field background"]
    schema, labels = caption_labels("scenes", caps)
    assert schema["objects"] == Attribute("objects", CLASS, ("2", "3"))
    assert schema["shapes"].values == ("circle", "square", "cross", "ring")   # vocabulary order, only those seen
    assert schema["colours"].values == ("red", "blue", "white")
    np.testing.assert_array_equal(labels["objects"], [0, 1])
    np.testing.assert_array_equal(labels["shapes"], [[1, 0, 1, 0], [1, 1, 0, 1]])
    np.testing.assert_array_equal(labels["colours"], [[1, 1, 0], [1, 1, 1]])
    assert label_counts(schema, labels)["shapes"] == {"circle": 2, "square": 1, "cross": 1, "ring": 1}
    # a value the schema was not built with is refused, naming the caption
    with pytest.raises(ValueError, match="green"):
        schema.encode(["a photo of a green cross and a blue circle on a plain background"])
    # derm keeps its fixed classes even when only one occurs in the captions... but one class is refused
    derm = attribute_schema("derm", ["an image of a small dark <lesion> on <skin>",
                                     "an image of a large dark <lesion> on <skin>"])
    assert derm["size"].values == ("small", "medium", "large") and derm["contrast"].values == ("dark", "faint")
    np.testing.assert_array_equal(derm.encode(["an image of a large faint <lesion> on <skin>"])["size"], [2])
    with pytest.raises(ValueError, match="two classes"):
        attribute_schema("scenes", caps[:1])
    with pytest.raises(ValueError, match="no caption names any findings"):
        attribute_schema("cxr", ["a chest x-ray with no finding"])
    cxr, y = caption_labels("cxr", ["a chest x-ray with no finding", "a chest x-ray with hernia and edema"])
    assert cxr["findings"].values == ("edema", "hernia")   # NIH order
    np.testing.assert_array_equal(y["findings"], [[0, 0], [1, 1]])


# ------------------------------------------------------------------------------------ attribute classifier

SYNTH = AttributeSchema("synthetic", (Attribute("colour", CLASS, ("red", "green", "blue")),
                                      Attribute("quadrants", MULTI, ("top left", "top right", "bottom left", "bottom right"))))


def _synthetic(n: int, seed: int, side: int = 16) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The mean colour encodes the class; each quadrant darkened (or not) is one multi-hot label."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    quad = (rng.random((n, 4)) < 0.5).astype(np.float32)
    base = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]], float)[cls]
    im = base[:, None, None, :] + rng.normal(0, 25, (n, side, side, 3))
    h = side // 2
    for k, (y, x) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
        im[quad[:, k] > 0, y:y + h, x:x + h] *= 0.4
    return np.clip(im, 0, 255).astype(np.uint8), {"colour": cls, "quadrants": quad}


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    images, labels = _synthetic(256, seed=0)
    # no mirroring: left and right quadrants are different labels here
    model = train_attribute_classifier(images, labels, SYNTH, steps=300, batch_size=32, lr=3e-3, width=8, depth=3,
                                       flip=False, seed=0)
    return model


def test_classifier_learns_a_separable_task_and_scores_near_chance_on_shuffled_labels(trained):
    images, labels = _synthetic(128, seed=1)
    table = score(trained, images, labels)
    assert table.loc["colour", "metric"] == "accuracy" and table.loc["quadrants", "metric"] == "macro AUROC"
    assert table.loc["colour", "score"] >= 0.95 and table.loc["quadrants", "score"] >= 0.95
    assert table.loc["colour", "chance"] == pytest.approx(majority_rate(labels["colour"]))
    assert table.loc["quadrants", "chance"] == 0.5 and table.loc["quadrants", "n_labels"] == 4
    shuffled = {k: v[np.random.default_rng(2).permutation(len(v))] for k, v in labels.items()}
    chance = score(trained, images, shuffled)
    assert chance.loc["colour", "score"] < chance.loc["colour", "chance"] + 0.15
    assert abs(chance.loc["quadrants", "score"] - 0.5) < 0.12
    # float (N, 3, H, W) images in [0, 1] (what sampling returns) score the same as their uint8 originals
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pd.testing.assert_frame_equal(score(trained, as_float, labels), table)


def test_classifier_trained_on_shuffled_labels_stays_near_chance():
    images, labels = _synthetic(128, seed=3)
    shuffled = {k: v[np.random.default_rng(4).permutation(len(v))] for k, v in labels.items()}
    model = train_attribute_classifier(images, shuffled, SYNTH, steps=60, batch_size=32, lr=3e-3, width=8, depth=3,
                                       flip=False, seed=0)
    test_images, test_labels = _synthetic(256, seed=5)
    table = score(model, test_images, test_labels)
    assert table.loc["colour", "score"] < majority_rate(test_labels["colour"]) + 0.15
    assert abs(table.loc["quadrants", "score"] - 0.5) < 0.12


def test_training_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    images, labels = _synthetic(64, seed=6)
    kw = dict(steps=5, batch_size=16, width=4, depth=2, seed=7)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_attribute_classifier(images, labels, SYNTH, **kw)
    assert torch.equal(torch.rand(1), before)   # the caller's global RNG stream is untouched
    b = train_attribute_classifier(images, labels, SYNTH, **kw)
    c = train_attribute_classifier(images, labels, SYNTH, **{**kw, "seed": 8})
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_classifier_refuses_labels_that_do_not_fit():
    images, labels = _synthetic(8, seed=0)
    with pytest.raises(ValueError, match="lack attribute 'quadrants'"):
        train_attribute_classifier(images, {"colour": labels["colour"]}, SYNTH, steps=1, batch_size=4)
    with pytest.raises(ValueError, match=r"labels\['colour'\] has shape \(7,\)"):
        train_attribute_classifier(images, {**labels, "colour": labels["colour"][:7]}, SYNTH, steps=1, batch_size=4)
    with pytest.raises(ValueError, match="outside 0..2"):
        train_attribute_classifier(images, {**labels, "colour": labels["colour"] + 3}, SYNTH, steps=1, batch_size=4)


def test_a_constant_classifier_scores_exactly_at_chance_under_both_class_rules():
    model = AttributeClassifier(SYNTH, width=4, depth=2).eval()
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0][:head.bias.numel()]))  # always "red"; top left only
    images = np.zeros((8, 8, 8, 3), np.uint8)
    labels = {"colour": np.array([0, 0, 0, 0, 0, 1, 1, 2]),
              "quadrants": np.array([[1, 0, 0, 0]] * 4 + [[0, 1, 1, 0]] * 4, np.float32)}
    acc = score(model, images, labels)
    assert acc.loc["colour", "score"] == acc.loc["colour", "chance"] == 5 / 8     # majority rate
    assert acc.loc["quadrants", "score"] == 0.5 and acc.loc["quadrants", "n_labels"] == 3  # tied scores
    bal = score(model, images, labels, class_metric="balanced accuracy")
    # recalls 1, 0, 0 over the three classes present -> 1/3, which is exactly 1/k
    assert bal.loc["colour", "score"] == pytest.approx(1 / 3) and bal.loc["colour", "chance"] == pytest.approx(1 / 3)
    # hand case: y = 0,0,0,1, predictions 0,0,1,1 -> accuracy 3/4 (chance 3/4), balanced (2/3 + 1)/2 (chance 1/2)
    y, pred = np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])
    assert _class_score(y, pred, "accuracy")[:2] == (0.75, 0.75)
    assert _class_score(y, pred, "balanced accuracy")[:2] == pytest.approx((5 / 6, 0.5))
    with pytest.raises(ValueError, match="class_metric"):
        score(model, images, labels, class_metric="f1")


def test_macro_auroc_against_sklearn_and_a_hand_computed_case():
    # hand: positives score 0.35 and 0.8, negatives 0.1 and 0.4 -> 3 of 4 pairs ordered -> 0.75
    y = np.array([[0, 0], [0, 0], [1, 0], [1, 0]])      # the second label never occurs: left out, not 0.5
    s = np.array([[0.1, 0.3], [0.4, 0.2], [0.35, 0.9], [0.8, 0.1]])
    assert macro_auroc(y, s) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    y = (rng.random((50, 5)) < 0.3).astype(int)
    y[:, 2] = 1                                          # all positive: left out as well
    s = rng.random((50, 5)) + 0.5 * y
    keep = [0, 1, 3, 4]
    assert macro_auroc(y, s) == pytest.approx(roc_auc_score(y[:, keep], s[:, keep], average="macro"))
    assert math.isnan(macro_auroc(np.zeros((4, 2)), s[:4, :2]))
    # min_count: a label with fewer positives (or negatives) than that is left out too
    rare = y[:, 0].copy()
    rare[:] = 0
    rare[:2] = 1
    y2 = np.column_stack([rare, y[:, 1]])
    s2 = s[:, :2]
    assert macro_auroc(y2, s2, min_count=3) == pytest.approx(roc_auc_score(y[:, 1], s[:, 1]))
    assert macro_auroc(y2, s2) == pytest.approx(roc_auc_score(y2, s2, average="macro"))
    assert majority_rate(np.array([0, 1, 1, 2])) == 0.5


# ------------------------------------------------------------------------------------------------ criteria


def test_gaussian_ceiling_has_the_data_s_per_pixel_mean_and_std():
    # data built so each pixel's mean and (ddof 0) std are known exactly: half the images at mu + sd, half at mu - sd
    rng = np.random.default_rng(0)
    mu, sd = rng.uniform(100, 160, (4, 4, 3)), rng.uniform(4, 12, (4, 4, 3))
    data = np.rint(np.concatenate([np.repeat((mu + sd)[None], 5, 0), np.repeat((mu - sd)[None], 5, 0)])).astype(np.uint8)
    mu_d, sd_d = data.mean(0), data.std(0)               # after rounding to uint8
    ceiling = gaussian_ceiling_images(data, n=20000, seed=3)
    assert ceiling.dtype == np.uint8 and ceiling.shape == (20000, 4, 4, 3)
    got = ceiling.astype(float)
    # mean within 5 standard errors; std with rounding's extra variance 1/12 (no clipping: mu - 6 sd > 0)
    assert np.abs(got.mean(0) - mu_d).max() < 5 * sd_d.max() / np.sqrt(20000)
    np.testing.assert_allclose(got.std(0), np.sqrt(sd_d**2 + 1 / 12), rtol=0.03)
    np.testing.assert_array_equal(gaussian_ceiling_images(data, n=3, seed=3), gaussian_ceiling_images(data, n=3, seed=3))
    # float images stay float in [0, 1]; a constant pixel stays constant
    flat = np.zeros((4, 2, 2, 3))
    flat[:, 0, 0, 0] = [0.0, 1.0, 0.0, 1.0]
    f = gaussian_ceiling_images(flat, n=1000, seed=0)
    assert f.min() >= 0 and f.max() <= 1 and np.all(f[:, 1, 1] == 0)
    assert f[:, 0, 0, 0].mean() == pytest.approx(0.5, abs=0.03)


def test_distance_criterion_on_sample_distance_s_dict_and_on_a_triple():
    # chapter 2's derm numbers today: samples 0.044, floor 0.016, ceiling 0.041 -> threshold 0.0285
    sw = {"samples": 0.044, "floor (train vs held-out data)": 0.016, "ceiling (per-pixel Gaussian)": 0.041}
    row = distance_criterion(sw).iloc[0]
    assert row["threshold"] == pytest.approx(0.0285) and not row["passed"] and row["status"] == "fail"
    assert row["margin"] == pytest.approx(-0.0155) and row["position"] == pytest.approx(0.028 / 0.025)
    ok = distance_criterion((20.0, 10.0, 50.0), metric="FID").iloc[0]   # threshold 30
    assert ok["passed"] and ok["margin"] == pytest.approx(10.0) and ok["quantity"] == "FID"
    at = distance_criterion(30.0, floor=10.0, ceiling=50.0).iloc[0]
    assert at["passed"] and at["margin"] == 0.0
    assert distance_criterion(1.0, floor=2.0, ceiling=2.0).iloc[0]["status"] == "undefined"
    # the real dict sample_distance returns is accepted as is
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (3, 12, 8, 8, 3), dtype=np.uint8)
    real = distance_criterion(sample_distance(imgs[0], imgs[1], imgs[2], side=4)).iloc[0]
    assert np.isfinite(real["value"]) and real["status"] in ("pass", "fail")
    with pytest.raises(ValueError, match="floor and ceiling"):
        distance_criterion(0.1)


def test_prompt_fidelity_chance_corrected_above_at_below_and_undefined():
    s = {"above": 0.9, "at": 0.85, "below": 0.6, "real at chance": 0.55}
    r = {"above": 1.0, "at": 1.0, "below": 1.0, "real at chance": 0.51}
    t = prompt_fidelity_criterion(s, r, chance=0.5).set_index("quantity")
    assert t.loc["above", "value"] == pytest.approx(0.8) and t.loc["above", "passed"]
    assert t.loc["above", "margin"] == pytest.approx(0.1)
    assert t.loc["at", "value"] == pytest.approx(0.7) and t.loc["at", "passed"]        # (0.85-0.5)/(1-0.5)
    assert t.loc["below", "value"] == pytest.approx(0.2) and not t.loc["below", "passed"]
    assert t.loc["below", "margin"] == pytest.approx(-0.5)
    assert t.loc["below", "raw_ratio"] == pytest.approx(0.6)   # the raw ratio alone would look much better
    assert t.loc["real at chance", "status"] == "undefined" and not t.loc["real at chance", "passed"]
    assert math.isnan(t.loc["real at chance", "value"]) and "did not learn" in t.loc["real at chance", "note"]
    assert math.isnan(chance_corrected_ratio(0.9, 0.5, 0.5))
    # per-attribute chance from a score table's Series; AUROC chance 0.5 against accuracy's majority rate
    real = pd.DataFrame({"score": [0.9, 0.8], "chance": [0.6, 0.5]}, index=["size", "findings"])
    t2 = prompt_fidelity_criterion(pd.Series({"size": 0.75, "findings": 0.74}), real["score"], real["chance"])
    np.testing.assert_allclose(t2["value"], [0.15 / 0.3, 0.24 / 0.3])
    with pytest.raises(ValueError, match="no value for"):
        prompt_fidelity_criterion({"size": 0.7}, {"contrast": 0.8}, 0.5)


def test_vae_criterion_ratio_and_psnr_beside_it():
    t = vae_criterion({"size": 0.475, "contrast": 0.9, "segmenter IoU": 0.6},
                      {"size": 0.5, "contrast": 0.9, "segmenter IoU": 0.75}, psnr_db=24.5,
                      chance={"size": 0.4, "contrast": 0.5, "segmenter IoU": 0.0}).set_index("quantity")
    assert t.loc["size", "value"] == 0.95 and t.loc["size", "passed"] and t.loc["size", "margin"] == 0.0
    assert t.loc["contrast", "value"] == 1.0 and t.loc["contrast", "passed"]
    assert t.loc["segmenter IoU", "value"] == pytest.approx(0.8) and not t.loc["segmenter IoU", "passed"]
    assert t.loc["segmenter IoU", "margin"] == pytest.approx(-0.15)
    assert (t["psnr_db"] == 24.5).all()
    assert t.loc["size", "chance_corrected_ratio"] == pytest.approx(0.075 / 0.1)
    assert vae_criterion(0.3, 0.0).iloc[0]["status"] == "undefined"


def test_affinity_criterion_and_the_bar_s_summary():
    assert affinity_criterion(2.1, 2.0).iloc[0]["passed"]
    low = affinity_criterion(1.8, 2.0).iloc[0]
    assert not low["passed"] and low["margin"] == pytest.approx(-0.2)
    assert affinity_criterion(1.95, 2.0, tolerance=0.1).iloc[0]["passed"]
    table = bar_table(distance_criterion((0.044, 0.016, 0.041)), affinity_criterion(1.8, 2.0),
                      prompt_fidelity_criterion({"shapes": 0.9}, {"shapes": 0.505}, 0.5))
    assert list(table["criterion"]) == ["distance", "self-attention affinity", "prompt fidelity"]
    lines = failures(table)
    assert len(lines) == 3
    assert lines[0] == "distance (SW1): 0.044 vs threshold 0.0285, fails by 0.0155"
    assert lines[1].startswith("self-attention affinity (affinity ratio): 1.8 vs threshold 2, fails by 0.2")
    assert "did not learn shapes" in lines[2]
