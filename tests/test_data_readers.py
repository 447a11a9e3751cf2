"""Readers on the real samples (../shared/data), on defective trees and on a tiny MIMIC-CXR-JPG tree."""
import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ctrlgen.data.readers import cxr, derm
from ctrlgen.data.readers.common import ReadOptions
from ctrlgen.data.records import DataError
from ctrlgen.data.splits import assign_splits, split_counts
from data_fixtures import SHARED_DATA, needs_shared, smoke_cfg  # noqa: F401

HEADER = ReadOptions(verify="header")


@needs_shared
def test_isic2018_task1_real_samples():
    ds = derm.read_isic2018_task1(SHARED_DATA / "isic2018", HEADER)
    assert len(ds) == 2594 and not ds.issues
    assert ds.splits == dict(zip(("train", "val", "test"), split_counts(2594, (0.8, 0.1, 0.1))))
    r = ds[0]
    assert r.mask_path.name == f"{r.id}_segmentation.png"
    assert r.load_mask().dtype == bool and r.load_image().shape == (256, 256, 3)


@needs_shared
def test_ham10000_class_imbalance_and_grouped_split():
    ds = derm.read_ham10000(SHARED_DATA / "ham10000", ReadOptions())
    counts = ds.label_counts()
    assert sum(counts.values()) == 10015
    assert counts["nv"] / 10015 == pytest.approx(0.669, abs=0.001)  # thesis §4.4.1: NV dominates
    assert len(ds.with_images()) == 5 and sum(r.mask_path is not None for r in ds) == 5
    split_of_lesion = {}
    for r in ds:
        assert split_of_lesion.setdefault(r.meta["lesion_id"], r.split) == r.split


@needs_shared
def test_task3_official_splits():
    ds = derm.read_isic2018_task3(SHARED_DATA / "isic2018", HEADER, ham_root=SHARED_DATA / "ham10000")
    assert ds.splits == {"train": 10015, "val": 193, "test": 1512}
    table = pd.read_csv(SHARED_DATA / "isic2018" / "ISIC2018_Task3_Test_GroundTruth.csv")
    first = table.iloc[0]
    rec = next(r for r in ds.split("test") if r.id == first["image"])
    assert rec.label.upper() == first[list(derm.TASK3_COLUMNS)].astype(float).idxmax()


@needs_shared
def test_ph2_partial_copy_reads_quietly():
    """The shared copy holds 100 of the 200 images and all 200 masks: the 100 mask-only cases are not in
    this copy (no image folder), which is no defect: no issue, a count in the description."""
    ds = derm.read_ph2(SHARED_DATA / "ph2" / "PH2Dataset", HEADER)
    assert len(ds) == 100 and not ds.issues and ds.issue_summary() == ""
    assert "100 case(s) with a lesion mask but no image folder" in ds.description
    assert ds.label_counts() == {"common_nevus": 30, "atypical_nevus": 30, "melanoma": 40}


def _ph2_case(root: Path, name: str, image: bool, image_folder: bool, mask: bool) -> None:
    case = root / derm.PH2_IMAGES / name
    case.mkdir(parents=True)
    if image_folder:
        (case / f"{name}_Dermoscopic_Image").mkdir()
    if image:
        Image.new("RGB", (8, 6), (120, 80, 60)).save(case / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
    if mask:
        (case / f"{name}_lesion").mkdir()
        Image.new("L", (8, 6), 255).save(case / f"{name}_lesion" / f"{name}_lesion.bmp")


def test_ph2_defects_stay_issues_and_absent_cases_do_not(tmp_path):
    _ph2_case(tmp_path, "IMD001", image=True, image_folder=True, mask=True)    # complete
    _ph2_case(tmp_path, "IMD002", image=False, image_folder=False, mask=True)  # not in this copy: quiet
    _ph2_case(tmp_path, "IMD003", image=False, image_folder=True, mask=True)   # image folder, image missing
    _ph2_case(tmp_path, "IMD004", image=True, image_folder=True, mask=False)   # image without mask
    (tmp_path / "PH2_dataset.txt").write_text("IMD001\t2\nIMD003\t0\nIMD004\t1\n")
    ds = derm.read_ph2(tmp_path, HEADER)
    assert [r.id for r in ds] == ["IMD001"] and ds[0].label == "melanoma"
    assert sorted((Path(i.path).name, i.reason) for i in ds.issues) == [
        ("IMD003_lesion.bmp", "mask without image"), ("IMD004.bmp", "image without mask")]
    assert "1 case(s) with a lesion mask but no image folder" in ds.description
    assert ds.issue_summary().startswith("ph2: 2 file(s) not used")


@needs_shared
def test_derm7pt_ddi_fitzpatrick_tables():
    d7 = derm.read_derm7pt(SHARED_DATA / "derm7pt", HEADER)
    expected = {s: len(pd.read_csv(SHARED_DATA / "derm7pt" / "meta" / f)) for s, f in
                (("train", "train_indexes.csv"), ("val", "valid_indexes.csv"), ("test", "test_indexes.csv"))}
    assert d7.splits == expected and len(d7) == 1011
    ddi = derm.read_ddi(SHARED_DATA / "ddi", HEADER)
    assert len(ddi) == 267 and set(ddi.label_counts()) <= {"I-II", "III-IV", "V-VI"}
    fz = derm.read_fitzpatrick17k(SHARED_DATA / "fitzpatrick17k", HEADER)
    assert len(fz) == 16577 and fz.records[0].image_path is None


@needs_shared
def test_cxr_real_tables():
    nih = cxr.read_nih_chestxray14(SHARED_DATA / "cxr" / "nih_chestxray14", HEADER)
    index = pd.read_csv(SHARED_DATA / "cxr" / "nih_chestxray14" / "images_64_index.csv")
    assert len(nih) == 1000 and nih.splits == {"train": 600, "val": 200, "test": 200}
    assert (nih[0].label == "No Finding") == (index.set_index("Image Index").loc[nih[0].id, "normal_or_abnormal"] == "normal")
    iu = cxr.read_iu_xray(SHARED_DATA / "cxr" / "iu_xray", HEADER)
    assert iu.splits == {"train": 2069, "val": 296, "test": 590}
    labels = cxr.read_chexpert_labels(SHARED_DATA / "cxr" / "chexpert")
    assert list(labels.columns) == list(cxr.CHEXPERT_LABELS) and len(labels) == 223414


# ---------------------------------------------------------------- defects, built in tmp_path
def _png(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _defective_isic(root: Path) -> Path:
    images, masks = root / "ISIC2018_Task1-2_Training_Input", root / "ISIC2018_Task1_Training_GroundTruth"
    lesion = np.zeros((16, 16), np.uint8)
    lesion[4:10, 4:10] = 255
    for i in range(3):  # three good pairs
        _png(images / f"ISIC_000000{i}.png", np.full((16, 16, 3), 150))
        _png(masks / f"ISIC_000000{i}_segmentation.png", lesion)
    _png(masks / "ISIC_0000010_segmentation.png", lesion)                       # mask without image
    _png(images / "ISIC_0000011.png", np.full((16, 16, 3), 150))               # image without mask
    _png(images / "ISIC_0000012.png", np.full((16, 16, 3), 150))               # empty mask
    _png(masks / "ISIC_0000012_segmentation.png", np.zeros((16, 16)))
    _png(images / "ISIC_0000013.png", np.full((16, 16, 3), 150))               # size mismatch
    _png(masks / "ISIC_0000013_segmentation.png", np.zeros((8, 8)) + 255)
    _png(images / "ISIC_0000014.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3)))  # truncated
    data = (images / "ISIC_0000014.png").read_bytes()
    (images / "ISIC_0000014.png").write_bytes(data[: len(data) // 2])
    _png(masks / "ISIC_0000014_segmentation.png", np.zeros((64, 64)) + 255)
    (images / "ISIC_0000015.png").write_bytes(b"not an image")                # unreadable
    _png(masks / "ISIC_0000015_segmentation.png", lesion)
    return root


def test_defects_are_reported_not_dropped(tmp_path):
    ds = derm.read_isic2018_task1(_defective_isic(tmp_path / "isic2018"), ReadOptions(verify="full"))
    assert sorted(r.id for r in ds) == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    reasons = {Path(i.path).name: i.reason for i in ds.issues}
    assert reasons["ISIC_0000010_segmentation.png"] == "mask without image"
    assert reasons["ISIC_0000011.png"] == "image without mask"
    assert reasons["ISIC_0000012_segmentation.png"].startswith("empty mask")
    assert reasons["ISIC_0000013_segmentation.png"].startswith("size mismatch: mask 8x8 differs from image 16x16")
    assert reasons["ISIC_0000014.png"].startswith("truncated file")
    assert reasons["ISIC_0000015.png"].startswith("unreadable file")
    assert len(ds.issues) == 6
    summary = ds.issue_summary()
    assert summary.startswith("isic2018_task1: 6 file(s) not used") and "ISIC_0000015.png" in summary
    with pytest.raises(DataError, match="strict mode"):
        derm.read_isic2018_task1(tmp_path / "isic2018", ReadOptions(verify="full", strict=True))


def test_missing_folder_is_reported(tmp_path):
    root = _defective_isic(tmp_path / "isic2018")
    for p in (root / "ISIC2018_Task1_Training_GroundTruth").iterdir():
        p.unlink()
    (root / "ISIC2018_Task1_Training_GroundTruth").rmdir()
    ds = derm.read_isic2018_task1(root, ReadOptions(verify="none"))
    assert len(ds) == 0
    assert any(i.reason == "missing folder" for i in ds.issues)
    assert sum(i.reason == "image without mask" for i in ds.issues) == 8
    with pytest.raises(DataError, match="not found"):
        derm.read_isic2018_task1(tmp_path / "nothing", ReadOptions())


def test_splits_are_deterministic_and_exact():
    keys = [f"id{i}" for i in range(101)]
    a = assign_splits(keys, (0.8, 0.1, 0.1), seed=5)
    assert a == assign_splits(list(reversed(keys)), (0.8, 0.1, 0.1), seed=5)
    assert a != assign_splits(keys, (0.8, 0.1, 0.1), seed=6)
    assert sorted(pd.Series(a).value_counts().tolist()) == [10, 10, 81]
    assert split_counts(7, (1, 1, 1)) == [3, 2, 2]


# ---------------------------------------------------------------- MIMIC-CXR-JPG, a tiny tree written by hand
def _gz_csv(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode()))


def test_mimic_cxr_tiny_official_tree(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    root.mkdir()
    rows = [("aaa-1", 10000032, 50414267, "PA", "train"), ("bbb-2", 10000032, 53189527, "AP", "train"),
            ("ccc-3", 11000011, 52000001, "PA", "test")]
    for dicom, subject, study, _, _ in rows[:2] + rows[2:]:
        folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
        _png(folder / f"{dicom}.jpg".replace(".jpg", ".png"), np.zeros((8, 8)))
        (folder / f"{dicom}.png").rename(folder / f"{dicom}.jpg")
    (root / "files" / "p10" / "p10000032" / "s50414267.txt").write_text(
        "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n FINDINGS: \n \n"
        " The heart is enlarged.\n There is no pneumothorax.\n \n IMPRESSION: \n \n Cardiomegaly.\n")
    _gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", "dicom_id,subject_id,study_id,ViewPosition\n" +
            "".join(f"{d},{s},{t},{v}\n" for d, s, t, v, _ in rows) + "ddd-4,11000011,52000001,LATERAL\n")
    labels = sorted(cxr.CHEXPERT_LABELS)
    line = {c: "" for c in labels} | {"Cardiomegaly": "1.0", "Pneumothorax": "0.0", "Edema": "-1.0"}
    _gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "subject_id,study_id," + ",".join(labels) + "\n"
            + "10000032,50414267," + ",".join(line[c] for c in labels) + "\n")
    _gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", "dicom_id,study_id,subject_id,split\n" +
            "".join(f"{d},{t},{s},{'validate' if d == 'bbb-2' else sp}\n" for d, s, t, _, sp in rows))
    ds = cxr.read_mimic_cxr(root, ReadOptions(verify="header"))
    by_id = {r.id: r for r in ds}
    assert set(by_id) == {"aaa-1", "bbb-2", "ccc-3"}
    assert {r.id: r.split for r in ds} == {"aaa-1": "train", "bbb-2": "val", "ccc-3": "test"}
    a = by_id["aaa-1"]
    assert a.labels["Cardiomegaly"] == 1.0 and a.labels["Pneumothorax"] == 0.0 and a.labels["Edema"] == -1.0
    assert np.isnan(a.labels["Atelectasis"]) and a.meta["view"] == "PA"
    assert a.meta["sections"]["IMPRESSION"] == "Cardiomegaly."
    assert a.meta["sections"]["FINDINGS"] == "The heart is enlarged. There is no pneumothorax."
    reasons = sorted(i.reason for i in ds.issues)
    assert reasons == ["image listed in metadata but not on disk", "study without CheXpert labels",
                       "study without CheXpert labels", "study without CheXpert labels"]
