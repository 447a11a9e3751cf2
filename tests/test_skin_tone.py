"""Skin-tone annotation (thesis §5.4.1, Table 5.1): ITA thresholds in every branch, the two ITA baselines on images of
known CIELAB colour, the ensembles and the final annotator."""
import numpy as np
import pytest
from skimage.color import lab2rgb

from ctrlgen.methods.skin_tone import (
    ENSEMBLE_BASES,
    ENSEMBLES,
    SkinToneAnnotator,
    classification_scores,
    fit_ensembles,
    group_index,
    ita_annotate,
    ita_to_group,
    ita_to_type,
    stack_features,
)


@pytest.mark.parametrize("ita, fst, group", [
    (70.0, "I", "I-II"), (55.01, "I", "I-II"),          # ITA > 55
    (55.0, "II", "I-II"), (42.0, "II", "I-II"),         # 55 >= ITA > 41
    (41.0, "III", "III-IV"), (28.5, "III", "III-IV"),   # 41 >= ITA > 28
    (28.0, "IV", "III-IV"), (19.5, "IV", "III-IV"),     # 28 >= ITA > 19
    (19.0, "V", "V-VI"), (10.5, "V", "V-VI"),           # 19 >= ITA > 10
    (10.0, "VI", "V-VI"), (-40.0, "VI", "V-VI"),        # ITA <= 10
    (float("nan"), "", ""),
])
def test_ita_to_fitzpatrick_thresholds_every_branch(ita, fst, group):
    assert ita_to_type(ita)[0] == fst
    assert ita_to_group(ita)[0] == group


def _lab_image(lightness, b, size=64, a=10.0):
    lab = np.zeros((size, size, 3))
    lab[..., 0], lab[..., 1], lab[..., 2] = lightness, a, b
    return (np.clip(lab2rgb(lab), 0, 1) * 255 + 0.5).astype(np.uint8)


def test_eight_patch_ita_is_the_maximum_over_the_edge_patches():
    # skin L*=55, b*=15 -> ITA = atan(5/15) = 18.43° (type V); one corner patch L*=70 -> atan(20/15) = 53.13° (II);
    # the image centre (no edge patch) is lighter still and must be ignored
    image = _lab_image(55.0, 15.0)
    image[:20, -20:] = _lab_image(70.0, 15.0, size=20)
    image[22:42, 22:42] = _lab_image(90.0, 15.0, size=20)
    ita, group = ita_annotate("8-patch ITA", image[None])
    assert ita[0] == pytest.approx(np.degrees(np.arctan(20 / 15)), abs=1.0)  # uint8 rounding of the RGB
    assert group[0] == "I-II"
    # without the light corner every patch is skin: ITA 18.43°, group V-VI
    ita, group = ita_annotate("8-patch ITA", _lab_image(55.0, 15.0)[None])
    assert ita[0] == pytest.approx(np.degrees(np.arctan(5 / 15)), abs=1.0) and group[0] == "V-VI"


def test_ycbcr_ita_and_unknown_method():
    ita, group = ita_annotate("ITA w/ YCbCr", _lab_image(70.0, 15.0)[None])
    assert ita[0] == pytest.approx(np.degrees(np.arctan(20 / 15)), abs=1.0) and group[0] == "I-II"
    with pytest.raises(ValueError, match="unknown ITA method"):
        ita_annotate("ITA", _lab_image(70.0, 15.0)[None])


def test_group_index_names_a_bad_label():
    assert group_index(["I-II", "V-VI", "III-IV"]).tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match=r"'' at position 1"):
        group_index(["I-II", ""])


def test_classification_scores_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    # per class precision: 0: 1/2, 1: 2/3, 2: 1/1; recall: 1/2, 1, 1/2
    prec, rec = (0.5 + 2 / 3 + 1) / 3, (0.5 + 1 + 0.5) / 3
    f1 = (0.5 + 2 * (2 / 3) / (2 / 3 + 1) + 2 * 0.5 / 1.5) / 3
    s = classification_scores(y, p)
    assert s["Precision ↑"] == pytest.approx(prec) and s["Recall ↑"] == pytest.approx(rec) and s["F1 Score ↑"] == pytest.approx(f1)


def test_ensembles_and_the_final_annotator_on_stacked_probabilities():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    probs = {b: np.eye(3)[y] * 0.7 + rng.uniform(0, 0.1, (90, 3)) for b in ENSEMBLE_BASES}
    x = stack_features(probs, ENSEMBLE_BASES)
    assert x.shape == (90, 9)
    fitted = fit_ensembles(x, y, seed=0)
    assert set(fitted) == set(ENSEMBLES)
    for model in fitted.values():
        assert (model.predict(x) == y).mean() > 0.95
    annotator = SkinToneAnnotator(ENSEMBLE_BASES, fitted["Logistic Regression"])
    assert annotator.predict(probs)[[0, 30, 60]].tolist() == ["I-II", "III-IV", "V-VI"]
    with pytest.raises(ValueError, match="no predictions for base model"):
        stack_features({"vgg16": probs["vgg16"]}, ENSEMBLE_BASES)
    with pytest.raises(ValueError, match="one class only"):
        fit_ensembles(x[:10], y[:10])
