"""Procedural worlds: deterministic, fast, written in the official layouts and read by the real readers."""
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from ctrlgen import result_cache
from ctrlgen.analysis.attribute_labels import parse_scenes_caption
from ctrlgen.data import datasets, load_dataset, load_multiconcept, world_root
from ctrlgen.data.readers.cxr import CHEXPERT_LABELS
from ctrlgen.data.worlds.common import grid
from ctrlgen.data.worlds.cxr import render_cxr, sample_labels, write_report
from ctrlgen.data.worlds.dermoscopy import generate_dermoscopy
from ctrlgen.data.worlds.multiconcept import (BACKGROUNDS, COLOURS, GRASS, MIN_CONTRAST, RADIUS, SHAPES, SKY,
                                            STRIPE_PERIOD, STRIPE_SHADE, TEXTURES, _shape_mask, _texture,
                                            Concept, customization_concepts,
                                            held_out_combinations, novel_pairs, pretrain_concepts, render_scene,
                                            scene_caption, write_multiconcept)
from data_fixtures import SHARED_DATA, needs_shared, smoke_cfg  # noqa: F401


def test_dermoscopy_deterministic_and_fast():
    start = time.perf_counter()
    a = generate_dermoscopy(1000, seed=1)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"1,000 scenes took {elapsed:.1f}s"
    b = generate_dermoscopy(8, seed=1)
    c = generate_dermoscopy(8, seed=2)
    assert np.array_equal(generate_dermoscopy(8, seed=1).images, b.images)
    assert not np.array_equal(b.images, c.images)
    assert a.images.shape == (1000, 64, 64, 3) and a.masks.dtype == bool and a.masks.any(axis=(1, 2)).all()
    share = (a.truth.dx == "nv").mean()
    assert 0.62 < share < 0.72  # HAM10000 proportions: 66.9 % NV
    np.testing.assert_allclose(a.truth.area_ratio, a.masks.mean(axis=(1, 2)))


def test_derm_world_layouts_read_by_real_readers(smoke_cfg):
    task1 = load_dataset("isic2018_task1", smoke_cfg, source="procedural")
    assert task1.source == "procedural" and "procedural world 'derm'" in task1.provenance
    n = smoke_cfg.data.max_samples
    assert len(task1) == n and not task1.issues
    r = task1[0]
    assert r.meta["truth"]["dx"] in ("nv", "mel", "bkl", "bcc", "akiec", "df", "vasc")
    assert r.load_image().shape == (64, 64, 3) and r.load_mask().any()
    world = world_root("derm", smoke_cfg)
    assert (world / "isic2018" / "ISIC2018_Task1-2_Training_Input" / f"{r.id}.jpg").is_file()
    ham = load_dataset("ham10000", smoke_cfg, source="procedural")
    assert set(ham.splits) <= {"train", "val", "test"} and all(x.image_path for x in ham)
    task3 = load_dataset("isic2018_task3", smoke_cfg, source="procedural", resolution=0)
    assert set(task3.splits) == {"train", "val", "test"}
    ph2 = load_dataset("ph2", smoke_cfg, source="procedural", resolution=0)
    assert ph2.records[0].image_path.suffix == ".bmp" and not ph2.issues
    assert set(ph2.label_counts()) <= {"common_nevus", "atypical_nevus", "melanoma"}


def test_auto_falls_back_to_world_and_resize_is_cached(smoke_cfg):
    ds = load_dataset("isic2018_task1", smoke_cfg)  # data root is empty in this fixture
    assert ds.source == "procedural" and "real data not used" in ds.provenance
    assert ds.resolution == 64
    mtime = ds[0].image_path.stat().st_mtime_ns
    again = load_dataset("isic2018_task1", smoke_cfg)
    assert again[0].image_path == ds[0].image_path and again[0].image_path.stat().st_mtime_ns == mtime
    masks = np.stack([r.load_mask() for r in ds])
    assert set(np.unique(np.stack([np.asarray(__import__("PIL.Image").Image.open(r.mask_path)) for r in ds]))) <= {0, 255}
    assert masks.any(axis=(1, 2)).all()


@needs_shared
def test_real_data_resized_with_binary_masks(smoke_cfg, monkeypatch):
    monkeypatch.setenv("CTRLGEN_DATA_ROOT", str(SHARED_DATA))
    ds = load_dataset("isic2018_task1", smoke_cfg, resolution=32)
    assert ds.source == "real" and len(ds) == smoke_cfg.data.max_samples
    image, mask = ds[0].load_image(), ds[0].load_mask()
    assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
    original = ds[0].meta["original_image"]
    assert original.startswith(str(SHARED_DATA.resolve()))
    ham = load_dataset("ham10000_segmentation", smoke_cfg, source="real", resolution=0)
    assert len(ham) == 5


def test_cxr_labels_images_and_reports_agree():
    labels = sample_labels(400, seed=0)
    no_finding = labels["No Finding"] == 1.0
    others = labels[[c for c in CHEXPERT_LABELS if c not in ("No Finding", "Support Devices")]]
    assert (no_finding == ~others.isin([1.0, -1.0]).any(axis=1)).all()
    images, anatomy = render_cxr(labels, 64, seed=0)
    assert images.shape == (400, 64, 64) and np.array_equal(images, render_cxr(labels, 64, seed=0)[0])
    # cardiomegaly widens the heart: compare the same scene with and without it
    pair = pd.concat([labels.iloc[[0]]] * 2, ignore_index=True)
    pair.loc[0, "Cardiomegaly"], pair.loc[1, "Cardiomegaly"] = 0.0, 1.0
    _, anat = render_cxr(pair, 64, seed=0)
    assert anat["heart"][1].sum() > 1.3 * anat["heart"][0].sum()
    row = labels.iloc[0].copy()
    for c in CHEXPERT_LABELS:
        row[c] = np.nan
    row["Pleural Effusion"], row["Pneumothorax"], row["Edema"] = 1.0, 0.0, -1.0
    row["Pleural Effusion_side"] = "left"
    report = write_report(row)
    assert "There is a left pleural effusion." in report and "There is no pneumothorax." in report
    assert "Possible mild pulmonary edema." in report
    assert re.search(r"IMPRESSION: \s+Possible pulmonary edema; left pleural effusion\.", report)


@needs_shared
def test_cxr_world_uses_real_cooccurrence_and_mimic_layout(smoke_cfg, monkeypatch):
    monkeypatch.setenv("CTRLGEN_DATA_ROOT", str(SHARED_DATA))
    ds = load_dataset("mimic_cxr", smoke_cfg, resolution=0)  # MIMIC is credentialed: never in shared data
    assert ds.source == "procedural" and len(ds) == smoke_cfg.data.max_samples
    truth = pd.read_csv(world_root("cxr", smoke_cfg) / "cxr_truth.csv")
    assert (truth.labels_from == "CheXpert label table").all()
    r = ds[0]
    assert set(r.labels) == set(CHEXPERT_LABELS) and "FINDINGS" in r.meta["sections"]
    assert r.meta["view"] == "PA" and r.image_path.parent.name == f"s{r.meta['study_id']}"


def test_multiconcept_scenes(smoke_cfg):
    ds = load_multiconcept(smoke_cfg)
    assert ds.splits == {"pretrain": smoke_cfg.data.worlds.multiconcept.n_pretrain, "customize": 16}
    custom = ds.split("customize")[0]
    masks = [np.asarray(__import__("PIL.Image").Image.open(m)) > 0 for m in custom.meta["masks"]]
    assert len(masks) == 2 and all(m.any() for m in masks) and not (masks[0] & masks[1]).any()
    combos = {(o["shape"], o["colour"], o["texture"]) for r in ds.split("pretrain") for o in r.meta["objects"]}
    assert not combos & held_out_combinations()
    custom_triples = {(c["shape"], c["colour"], c["texture"]) for r in ds.split("customize") for c in r.meta["concepts"]}
    assert custom_triples <= held_out_combinations() and {t[0] for t in custom_triples} <= set(SHAPES)
    for r in ds.split("customize"):   # the class names Stage I reads are the concepts' known shape words
        assert r.meta["class_names"] == [c["shape"] for c in r.meta["concepts"]]
    # no pretraining caption names a customization concept (read from the caption text, not the metadata)
    phrases = {f"a {Concept(*t).phrase}" for t in custom_triples}
    assert not phrases & {o for r in ds.split("pretrain") for o in _caption_objects(r.text)}
    # every complete caption reads back to its objects (issue 12's attribute labels); the caption as written
    # names each object by its whole phrase or, some of the time, by its shape alone
    bare = []
    for r in ds.records:
        objects = r.meta["objects"] if r.split == "pretrain" else r.meta["concepts"]
        full = r.meta["full_caption"] if r.split == "pretrain" else r.text
        assert parse_scenes_caption(full)["shapes"] == {o["shape"] for o in objects}
        assert {o["texture"] for o in objects} <= set(TEXTURES)
        assert _caption_objects(full) == [f"a {Concept(**o).phrase}" for o in objects]
        for written, o in zip(_caption_objects(r.text), objects, strict=True):
            assert written in (f"a {Concept(**o).phrase}", f"a {o['shape']}"), (r.text, o)
            bare.append(r.split == "pretrain" and written == f"a {o['shape']}")
    if smoke_cfg.data.worlds.multiconcept.bare_object_probability == 0:
        assert not any(bare)


# ---- the scenes world is learnable by a 64-pixel latent model (issue 12) ----

def _scenes(n: int, size: int, seed: int = 0, background: str | None = None):
    """``n`` pretraining-style scenes: (concepts, image, masks, caption, background)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        concepts = pretrain_concepts(rng, int(rng.choice([2, 3])))
        bg = background or str(rng.choice(BACKGROUNDS))
        out.append((concepts, *render_scene(concepts, size, rng, bg), bg))
    return out


def _rough_share(image: np.ndarray, masks: list[np.ndarray], level: float = 4.0) -> float:
    """Share of off-object pixels (objects dilated by 2 px, image border left out) whose Laplacian, in any
    channel, exceeds ``level`` grey levels: the high-frequency content of the background."""
    lap = np.abs(np.stack([ndimage.laplace(image[..., c].astype(np.float64)) for c in range(3)])).max(0)
    off = ~ndimage.binary_dilation(np.any(masks, axis=0), iterations=2)
    off[[0, -1], :] = off[:, [0, -1]] = False
    return float((lap[off] > level).mean())


def test_scene_backgrounds_have_no_fine_detail():
    for bg in BACKGROUNDS:
        shares = [_rough_share(image, masks) for _, image, masks, _, _ in _scenes(12, 64, seed=3, background=bg)]
        # plain and the gradient (linear in y) have a zero Laplacian; the field only along its horizon
        assert max(shares) <= (0.0 if bg in ("plain", "gradient") else 0.06), (bg, shares)
    # the measure sees per-pixel noise (the old "noise" background's kind of detail)
    _, image, masks, _, _ = _scenes(1, 64, background="plain")[0]
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 8, image.shape), 0, 255)
    assert _rough_share(noisy, masks) > 0.5


def test_every_texture_survives_a_4x_downsampling_vae():
    """The dominant period of each texture (2-D FFT peak) is at least 8 px at 64 px (two latent pixels of a
    16x16 latent) and, as a fraction of the side, the same at 512 px; plain has no periodic part."""
    for texture in TEXTURES:
        for size in (64, 512):
            yy, xx = grid(size, size)
            spectrum = np.abs(np.fft.fft2(_texture(texture, yy, xx) - _texture(texture, yy, xx).mean()))
            if texture == "plain":
                assert spectrum.max() < 1e-6
                continue
            fy, fx = np.unravel_index(np.argmax(spectrum), spectrum.shape)
            f = np.hypot(*(np.fft.fftfreq(size)[[fy, fx]]))  # cycles per pixel
            period = 1 / f
            assert period >= 8 * size / 64, (texture, size, period)
            assert period / size == pytest.approx(STRIPE_PERIOD, rel=0.05)  # the same look at every size
    assert set(TEXTURES) == {"plain", "striped"}
    shade = _texture("striped", *grid(64, 64))
    np.testing.assert_allclose(np.unique(shade), [STRIPE_SHADE, 1.0])   # chapter 3's colour_share reads these two shades


def test_every_shape_is_drawable_at_64_px():
    """At the smallest radius (three objects), each shape covers enough pixels and has no part thinner than
    3 px (an opening by a 3x3 square keeps most of it); the circle's area is the closed form πr²."""
    r = RADIUS[0] * 0.5 / 3
    for size in (64, 512):
        yy, xx = grid(size, size)
        for shape in SHAPES:
            mask = _shape_mask(shape, yy, xx, 0.5, 0.5, r)
            assert mask.sum() >= 70 * (size / 64) ** 2, (shape, size, mask.sum())
            if size == 64:
                kept = ndimage.binary_opening(mask, np.ones((3, 3))).sum() / mask.sum()
                assert kept >= 0.85, (shape, kept)
        circle = _shape_mask("circle", yy, xx, 0.5, 0.5, r).sum()
        assert circle == pytest.approx(np.pi * (r * size) ** 2, rel=0.05)
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        _shape_mask("blob", yy, xx, 0.5, 0.5, r)


def test_scene_captions_parse_back_to_the_rendered_objects():
    """Objects are disjoint, inside the image, left to right, drawn in their caption's colour (full shade,
    plus the stripe shade when striped) and the caption parses back to them."""
    for concepts, image, masks, caption, bg in _scenes(30, 64, seed=5):
        parsed = parse_scenes_caption(caption)
        assert parsed == {"objects": str(len(concepts)), "shapes": frozenset(c.shape for c in concepts),
                          "colours": frozenset(c.colour for c in concepts)}
        assert caption.endswith(f" on a {bg} background")
        assert all(m.any() and not (m[[0, -1]].any() or m[:, [0, -1]].any()) for m in masks)
        assert (np.sum(masks, axis=0) <= 1).all()
        centres = [np.nonzero(m)[1].mean() for m in masks]
        assert centres == sorted(centres)
        for c, m in zip(concepts, masks):
            colours = {tuple(p) for p in image[m]}
            full = tuple(COLOURS[c.colour])
            shaded = tuple(int(v) for v in (np.asarray(full, np.float32) * np.float32(STRIPE_SHADE)).astype(np.uint8))
            assert colours == ({full, shaded} if c.texture == "striped" else {full}), (caption, colours)


def test_backgrounds_keep_their_distance_from_the_objects():
    for concepts, image, masks, _, _ in _scenes(20, 32, seed=7, background="plain"):
        shades = np.array([COLOURS[c.colour] for c in concepts], float)
        shades = np.concatenate([shades, shades * STRIPE_SHADE])
        bg = image[~np.any(masks, axis=0)][0].astype(float)
        assert np.linalg.norm(shades - bg, axis=1).min() >= MIN_CONTRAST - 1  # uint8 rounding
    every = np.array(list(COLOURS.values()), float)
    every = np.concatenate([every, every * STRIPE_SHADE])
    assert min(np.linalg.norm(every - np.array(c), axis=1).min() for c in (SKY, GRASS)) >= 95


def test_scenes_scale_with_the_image_size():
    """The full profile renders at 512: the same draws give the same scene, only finer."""
    small = _scenes(4, 64, seed=11)
    large = _scenes(4, 512, seed=11)
    for (_, im64, m64, cap64, _), (_, im512, m512, cap512, _) in zip(small, large):
        assert cap64 == cap512
        for a, b in zip(m64, m512):
            assert a.mean() == pytest.approx(b.mean(), rel=0.1, abs=2e-3)
        down = im512.reshape(64, 8, 64, 8, 3).mean(axis=(1, 3))
        assert np.abs(down - im64).mean() < 12


def _caption_objects(caption: str) -> list[str]:
    """``a photo of a red circle and a blue striped ring on a plain background`` -> the object phrases."""
    assert caption.startswith("a photo of ") and " on a " in caption, caption
    return caption[len("a photo of "):caption.rindex(" on a ")].split(" and ")


def test_bare_objects_are_named_by_shape_alone_and_leave_the_images_alone(tmp_path):
    red, blue = Concept("circle", "red", "striped"), Concept("square", "blue", "plain")
    assert scene_caption([red, blue], "field", [True, False]) == "a photo of a circle and a blue square on a field background"
    assert scene_caption([red, blue], "plain") == "a photo of a red striped circle and a blue square on a plain background"
    with pytest.raises(ValueError, match="1 bare flags for 2 objects"):
        scene_caption([red, blue], "plain", [True])
    with pytest.raises(ValueError, match="bare_object_probability=1.5"):
        write_multiconcept(tmp_path / "bad", 2, 0, 32, seed=0, bare_object_probability=1.5)
    lines = {}
    for p in (0.0, 1.0):
        write_multiconcept(tmp_path / str(p), 6, 0, 32, seed=3, bare_object_probability=p)
        lines[p] = [json.loads(x) for x in (tmp_path / str(p) / "pretrain" / "captions.jsonl").read_text().splitlines()]
    for none, every in zip(lines[0.0], lines[1.0]):
        assert none["caption"] == none["full_caption"] == every["full_caption"]   # same scenes either way
        assert _caption_objects(every["caption"]) == [f"a {o['shape']}" for o in every["objects"]]
        same = [(tmp_path / str(p) / "pretrain" / line["file"]).read_bytes() for p, line in ((0.0, none), (1.0, every))]
        assert same[0] == same[1]


def test_complete_captions_name_every_attribute(smoke_cfg):
    from ctrlgen.config import load_profile
    from ctrlgen.data.caption_labels import with_complete_captions
    from ctrlgen.data.domains import load_domain_data

    cfg = load_profile("smoke", {"data.worlds.multiconcept.bare_object_probability": 0.3})
    data = load_domain_data(cfg, "scenes")
    full = with_complete_captions(cfg, data)
    assert full.ids == data.ids and full.images is data.images
    written = data.captions + data.heldout_captions
    for caption, complete in zip(written, full.captions + full.heldout_captions):
        assert len(parse_scenes_caption(complete)["colours"]) >= 1
        assert [o.split()[-1] for o in _caption_objects(caption)] == [o.split()[-1] for o in _caption_objects(complete)]
    assert any(c != f for c, f in zip(written, full.captions + full.heldout_captions))   # p = 0.3 of ~55 objects
    derm = load_domain_data(cfg, "derm")
    assert with_complete_captions(cfg, derm) is derm


def test_caption_objects_by_hand():
    assert _caption_objects("a photo of a red circle and a blue striped ring on a plain background") == [
        "a red circle", "a blue striped ring"]


def test_held_out_combinations_by_hand():
    """Every 7th (shape, colour, texture) of the product in declaration order: 6 · 8 · 2 = 96 triples, 14 held out;
    index 0 is (circle, red, plain), index 7 = colour 3 (yellow) striped, index 14 = colour 7 (black) plain."""
    held = held_out_combinations()
    assert len(held) == 14
    assert {("circle", "red", "plain"), ("circle", "yellow", "striped"), ("circle", "black", "plain")} == {
        h for h in held if h[0] == "circle"}
    assert [Concept(*t) for t in sorted(held)] == customization_concepts()


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_novel_pairs_are_sixteen_distinct_pairs_of_held_out_instances_of_known_shapes(seed):
    """Chapter 3's 16 customization sets (§3.6.1): distinct pairs, each of two novel instances of known classes —
    a shape of the base vocabulary in a (shape, colour, texture) triple held out of pretraining, whose class name
    the base model has learned to localize (§3.3.1) — that differ in shape (class name) and colour (feature
    fusion reads one concept's colour in the other's samples); drawn the same way for the same seed."""
    pairs = novel_pairs(16, seed)
    assert len({frozenset(p) for p in pairs}) == 16
    held = held_out_combinations()
    for a, b in pairs:
        assert a.shape != b.shape and a.colour != b.colour, (a, b)
        for c in (a, b):
            assert c.shape in SHAPES and (c.shape, c.colour, c.texture) in held, c
    uses = [sum(c in p for p in pairs) for c in customization_concepts()]
    assert min(uses) >= 2 and max(uses) - min(uses) <= 1      # 32 places over 14 concepts: every one 2 or 3 times
    assert novel_pairs(16, seed) == pairs and novel_pairs(16, seed + 100) != pairs
    assert novel_pairs(4, seed) == pairs[:4]                  # the smaller profiles read the first sets


def test_novel_pairs_cover_every_valid_pair_and_refuse_more():
    """By hand: 91 pairs of the 14 held-out concepts, less 10 of one shape (circle 3, diamond 3, and one each for
    cross, ring, square, triangle) and 6 of one colour (black, red, yellow, white, blue, orange): 75."""
    pairs = novel_pairs(75, 0)
    assert len({frozenset(p) for p in pairs}) == 75
    with pytest.raises(ValueError, match="n_customize=76.*expected 0 to 75"):
        novel_pairs(76, 0)


def test_pretraining_never_draws_a_customization_triple():
    rng = np.random.default_rng(3)
    drawn = {(c.shape, c.colour, c.texture) for _ in range(3000) for c in pretrain_concepts(rng, 3)}
    custom = {(c.shape, c.colour, c.texture) for p in novel_pairs(75, 0) for c in p}
    assert len(drawn) == 96 - 14 and not drawn & custom      # every other triple does occur


def test_world_key_follows_its_generator_code(smoke_cfg, monkeypatch):
    """A changed generator rebuilds its world: the folder key includes ``world_code``, which reads exactly the
    world's generator files (all present) and changes with their code."""
    monkeypatch.setattr(datasets, "world_code", lambda world: "a" * 16)
    before = datasets.world_root("multiconcept", smoke_cfg, build=False)
    monkeypatch.setattr(datasets, "world_code", lambda world: "b" * 16)
    assert datasets.world_root("multiconcept", smoke_cfg, build=False) != before
    monkeypatch.undo()
    lib = Path(datasets.__file__).resolve().parents[1]
    for world, files in datasets.WORLD_FILES.items():
        assert all((lib / f).is_file() for f in files), world
        assert "data/worlds/common.py" in files and "config.py" not in files
    assert len({datasets.world_code(w) for w in datasets.WORLD_FILES}) == 3


def test_source_digest_sees_code_not_comments(tmp_path):
    """``result_cache.source_digest``: a comment or docstring edit keeps the digest, a changed constant does not;
    function sources count the same whatever their indentation."""
    pkg = tmp_path / "lib" / "ctrlgen"
    pkg.mkdir(parents=True)
    (pkg / "w.py").write_text('def f():\n    """Doc."""\n    return 1\n')
    base = result_cache.source_digest(["w.py"], root=tmp_path)
    (pkg / "w.py").write_text('def f():\n    """Other doc."""\n    # note\n    return 1\n')
    assert result_cache.source_digest(["w.py"], root=tmp_path) == base
    (pkg / "w.py").write_text('def f():\n    return 2\n')
    assert result_cache.source_digest(["w.py"], root=tmp_path) != base
    nested = "    def g(x):\n        return x + 1\n"
    flat = "def g(x):\n    return x + 1  # why\n"
    assert result_cache.source_digest([], [nested], root=tmp_path) == result_cache.source_digest([], [flat], root=tmp_path)


def test_cxr_world_key_follows_the_chexpert_label_table(smoke_cfg, tmp_path, monkeypatch):
    """A CheXpert table appearing under the data root (it sets the CXR world's label co-occurrence) rebuilds it."""
    monkeypatch.setattr(datasets, "dataset_folder", lambda name, cfg: tmp_path)
    before = datasets.world_root("cxr", smoke_cfg, build=False)
    assert datasets.chexpert_label_source(smoke_cfg) == "built-in prevalences"
    (tmp_path / "chexpert_train.csv").write_text("Path,No Finding\nx,1\n")
    assert datasets.chexpert_label_source(smoke_cfg).startswith("chexpert_train.csv:")
    assert datasets.world_root("cxr", smoke_cfg, build=False) != before
