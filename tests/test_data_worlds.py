"""Procedural worlds: deterministic, fast, written in the official layouts and read by the real readers."""
import re
import time

import numpy as np
import pandas as pd
import pytest

from ctrlgen.data import load_dataset, load_multiconcept, world_root
from ctrlgen.data.readers.cxr import CHEXPERT_LABELS
from ctrlgen.data.worlds.cxr import render_cxr, sample_labels, write_report
from ctrlgen.data.worlds.dermoscopy import generate_dermoscopy
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
    pretrain_shapes = {o["shape"] for r in ds.split("pretrain") for o in r.meta["objects"]}
    from ctrlgen.data.worlds.multiconcept import NOVEL_SHAPES, held_out_combinations
    assert not pretrain_shapes & set(NOVEL_SHAPES)
    combos = {(o["shape"], o["colour"], o["texture"]) for r in ds.split("pretrain") for o in r.meta["objects"]}
    assert not combos & held_out_combinations()
    assert all(c["shape"] in NOVEL_SHAPES or (c["shape"], c["colour"], c["texture"]) in held_out_combinations()
               for r in ds.split("customize") for c in r.meta["concepts"])
