"""Lesion attributes (thesis §5.3.2) against hand-computed cases, scikit-image and the procedural world."""
import numpy as np
import pytest
from skimage.color import lab2rgb, rgb2lab
from skimage.draw import disk, ellipse

from ctrlgen.data import attributes as A


def _uniform_lab(lightness, a, b, size=16):
    rgb = lab2rgb(np.broadcast_to(np.array([lightness, a, b], float), (size, size, 3)).copy())
    return (rgb * 255 + 0.5).astype(np.uint8)


def test_ita_hand_computed():
    # b* > 0 (Eq. 5.1 as printed): (70, 20) -> 45 deg, (50, x) -> 0, (30, 20) -> -45, (50 + 20*sqrt(3), 20) -> 60
    got = A.ita_from_lab([70, 50, 30, 50 + 20 * np.sqrt(3)], [20, 15, 20, 20])
    np.testing.assert_allclose(got, [45, 0, -45, 60], atol=1e-9)


@pytest.mark.parametrize("lightness, b, expected, arctan", [
    (70.0, 20.0, 45.0, 45.0),                          # L* > 50, b* > 0: both formulas agree
    (70.0, -20.0, 135.0, -45.0),                       # L* > 50, b* < 0: light bluish skin, above 90 (arctan: -45)
    (50 + 20 * np.sqrt(3), -20.0, 120.0, -60.0),       # L* > 50, b* < 0: 180 - 60
    (30.0, 20.0, -45.0, -45.0),                        # L* < 50, b* > 0: both agree
    (30.0, -20.0, -135.0, 45.0),                       # L* < 50, b* < 0: dark bluish, below -90 (arctan: +45)
    (50 - 20 * np.sqrt(3), -20.0, -120.0, 60.0),       # L* < 50, b* < 0: -(180 - 60)
    (80.0, 0.0, 90.0, 90.0),                           # b* = 0, L* > 50: +90
    (20.0, 0.0, -90.0, -90.0),                         # b* = 0, L* < 50: -90
    (80.0, -0.0, 90.0, -90.0),                         # negative zero b* is zero (arctan: -inf, -90)
    (50.0, 0.0, 0.0, np.nan),                          # L* = 50, b* = 0: atan2(0, 0) = 0 (arctan: 0/0 = NaN)
    (50.0, -0.0, 0.0, np.nan),                         # ... and not 180 for a negative zero
])
def test_ita_every_quadrant(lightness, b, expected, arctan):
    assert A.ita_from_lab(lightness, b) == pytest.approx(expected, abs=1e-9)
    np.testing.assert_allclose(A.ita_arctan(lightness, b), arctan, atol=1e-9)


def test_ita_above_90_is_the_lightest_type_and_word():
    from ctrlgen.methods.didgen.dermprompt import skin_colour_name

    light_bluish, dark_bluish = A.ita_from_lab(70.0, -20.0), A.ita_from_lab(30.0, -20.0)
    assert list(A.fitzpatrick_type([light_bluish, dark_bluish, 180.0, -180.0])) == ["I", "VI", "I", "VI"]
    assert list(A.fitzpatrick_group([light_bluish, dark_bluish])) == ["I-II", "V-VI"]
    assert skin_colour_name(light_bluish) == "very light" and skin_colour_name(dark_bluish) == "dark"


def test_empty_region_gives_nan_ita_and_no_type():
    image = _uniform_lab(70, 12, 16)[None]
    full = np.ones((1, 16, 16), bool)
    frame = A.lesion_attributes(image, full)  # no skin left outside the lesion
    assert np.isnan(frame.ita_skin[0]) and np.isnan(frame.ita_difference[0]) and frame.fitzpatrick[0] == ""
    assert np.isfinite(frame.ita_lesion[0])
    assert np.isnan(A.ita_from_lab(np.nan, 10.0)) and np.isnan(A.ita_from_lab(60.0, np.nan))


def test_ita_difference_of_light_bluish_skin_is_high_contrast():
    # skin L* 72, b* -4 (light, slightly blue); lesion L* 40, b* 18 (brown): clearly high contrast
    skin, lesion = _uniform_lab(72, 2, -4), _uniform_lab(40, 15, 18)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    image = np.where(mask[..., None], lesion, skin)
    lab = rgb2lab(image / 255.0)
    skin_l, skin_b = lab[~mask, 0].mean(), lab[~mask, 2].mean()
    lesion_l, lesion_b = lab[mask, 0].mean(), lab[mask, 2].mean()
    assert skin_b < 0 < lesion_b
    expected_skin = 180.0 - np.degrees(np.arctan((skin_l - 50) / -skin_b))  # second quadrant by hand
    frame = A.lesion_attributes(image[None], mask[None])
    assert frame.ita_skin[0] == pytest.approx(expected_skin, abs=1e-9) and frame.ita_skin[0] > 90
    assert frame.ita_difference[0] > 30 and frame.fitzpatrick[0] == "I"
    changes = A.ita_formula_changes(image[None], mask[None], 30.0)
    assert changes.ita_skin_old[0] < -60 and bool(changes.low_contrast_old[0]) and not changes.low_contrast_new[0]
    assert changes.fitzpatrick_old[0] == "VI" and bool(changes.changed_type[0] and changes.changed_group[0])
    summary = A.summarize_ita_changes(changes)
    assert summary.loc["low-contrast label changed", "count"] == 1 and summary.loc["skin b* < 0", "count"] == 1


@pytest.mark.parametrize("ita, fst, group", [
    (55.01, "I", "I-II"), (55.0, "II", "I-II"), (41.01, "II", "I-II"), (41.0, "III", "III-IV"), (28.0, "IV", "III-IV"),
    (19.0, "V", "V-VI"), (10.01, "V", "V-VI"), (10.0, "VI", "V-VI"), (-40.0, "VI", "V-VI")])
def test_fitzpatrick_thresholds(ita, fst, group):
    assert A.fitzpatrick_type(ita)[0] == fst
    assert A.fitzpatrick_group(ita)[0] == group


def test_region_ita_matches_skimage_lab():
    skin, lesion = _uniform_lab(70, 12, 16), _uniform_lab(40, 18, 22)
    mask = np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    image = np.where(mask[..., None], lesion, skin)
    lab = rgb2lab(image / 255.0)
    expected_skin = np.degrees(np.arctan((lab[~mask, 0].mean() - 50) / lab[~mask, 2].mean()))
    expected_lesion = np.degrees(np.arctan((lab[mask, 0].mean() - 50) / lab[mask, 2].mean()))
    frame = A.lesion_attributes(image[None], mask[None])
    assert frame.ita_skin[0] == pytest.approx(expected_skin, abs=1e-9)
    assert frame.ita_lesion[0] == pytest.approx(expected_lesion, abs=1e-9)
    assert frame.ita_difference[0] == pytest.approx(expected_skin - expected_lesion, abs=1e-9)
    # and close to the Lab values the colours were made from (8-bit rounding only)
    assert frame.ita_skin[0] == pytest.approx(np.degrees(np.arctan(20 / 16)), abs=0.5)
    assert frame.area_ratio[0] == pytest.approx(64 / 256)


def test_circularity_disk_and_ellipse():
    masks = np.zeros((3, 128, 128), bool)
    masks[0][disk((64, 64), 40)] = True
    masks[1][disk((64, 64), 10)] = True
    masks[2][ellipse(64, 64, 20, 50)] = True
    got = A.circularity(masks)
    a, b = 50, 20  # Ramanujan's perimeter of an ellipse
    perimeter = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
    assert got[0] == pytest.approx(1.0, abs=0.02)
    assert got[1] == pytest.approx(1.0, abs=0.04)
    assert got[2] == pytest.approx(4 * np.pi * np.pi * a * b / perimeter**2, rel=0.04)
    assert np.isnan(A.circularity(np.zeros((1, 8, 8), bool))[0])


def test_ycbcr_skin_mask_and_baseline():
    skin = _uniform_lab(65, 15, 18)
    blue = np.zeros_like(skin)
    blue[..., 2] = 200
    image = np.concatenate([skin, blue], axis=1)
    mask = A.ycbcr_skin_mask(image[None])[0]
    assert mask[:, :16].all() and not mask[:, 16:].any()
    assert A.ita_ycbcr(image[None])[0] == pytest.approx(A.region_ita(skin[None], np.ones((1, 16, 16), bool))[0], abs=1e-9)


def test_eight_patch_takes_the_lightest_edge_patch():
    image = np.broadcast_to(_uniform_lab(40, 10, 15, 64)[:1, :1], (64, 64, 3)).copy()
    image[:20, :20] = _uniform_lab(75, 10, 15, 20)  # top-left corner patch lighter
    expected = A.ita_from_lab(*[v[0] for v in A.region_lab_means(image[None, :20, :20], np.ones((1, 20, 20), bool))])
    assert A.ita_eight_patch(image[None], 20)[0] == pytest.approx(expected, abs=1e-6)
    assert len(A.edge_patches(64, 64, 20)) == 8


def test_procedural_world_contrast_is_recovered():
    from ctrlgen.data.worlds.dermoscopy import DermWorldConfig, generate_dermoscopy

    clean = DermWorldConfig(hair_probability=0.0, vignette_probability=0.0)
    sweep = np.linspace(0, 80, 24)
    scenes = generate_dermoscopy(24, seed=3, config=clean, overrides={"ita_difference": sweep, "target_area": 0.2})
    measured = A.lesion_attributes(scenes.images, scenes.masks)
    np.testing.assert_allclose(measured.ita_skin, scenes.truth.skin_ita, atol=2.0)
    assert np.corrcoef(measured.ita_difference, scenes.truth.ita_difference)[0, 1] > 0.98
    assert np.median(np.abs(measured.ita_difference - scenes.truth.ita_difference)) < 4.0
