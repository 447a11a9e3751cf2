"""Readers for the dermoscopy / dermatology datasets, each on its official on-disk layout.

Thesis §4.4.1 (ISIC 2018 Task 1 and Task 3 = HAM10000, Derm7pt, PH2), §5.4.1 (Fitzpatrick17k, DDI),
§5.5.4 (HAM10000 expert segmentations, Tschandl et al. 2020).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ctrlgen.data.readers.common import (
    ReadOptions, apply_splits, finish, first_existing, limit, list_files, missing, pair_by_id, verify_files,
)
from ctrlgen.data.records import Dataset, ReadIssue, Record

HAM_CLASSES = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")  # Task 3 column order, lower case
TASK3_COLUMNS = tuple(c.upper() for c in HAM_CLASSES)
HAM_CLASS_NAMES = {"mel": "melanoma", "nv": "melanocytic nevus", "bcc": "basal cell carcinoma",
                   "akiec": "actinic keratosis / intraepithelial carcinoma", "bkl": "benign keratosis",
                   "df": "dermatofibroma", "vasc": "vascular lesion"}
PH2_CLASSES = ("common_nevus", "atypical_nevus", "melanoma")
FST_GROUPS = ("I-II", "III-IV", "V-VI")

ISIC_TASK1_FOLDERS = {  # split -> (images, masks), official ISIC 2018 names
    "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}
ISIC_TASK3_NAMES = {"train": "Training", "val": "Validation", "test": "Test"}
MASK_SUFFIX = "_segmentation"
HAM_IMAGE_FOLDERS = ("HAM10000_images", "HAM10000_images_part_1", "HAM10000_images_part_2")
HAM_MASK_FOLDER = "HAM10000_segmentations_lesion_tschandl"


def _masks(folder: Path, suffix: str = MASK_SUFFIX) -> dict[str, Path]:
    """Mask files ``<id><suffix>.png`` of ``folder``: id -> path."""
    return {stem[: -len(suffix)]: p for stem, p in list_files(folder).items() if stem.endswith(suffix)}


def _isic_images(folder: Path) -> dict[str, Path]:
    return {k: v for k, v in list_files(folder).items() if k.startswith("ISIC_") and not k.endswith(MASK_SUFFIX)}


def read_isic2018_task1(root: Path, options: ReadOptions) -> Dataset:
    """ISIC 2018 Task 1: ``ISIC_xxxxxxx.jpg`` images with ``ISIC_xxxxxxx_segmentation.png`` masks.

    Uses the official validation / test folders when they hold ground truth; otherwise splits the
    training set with the seed (thesis §4.4.1: 2,594 training image-mask pairs).
    """
    present = {s: (root / i, root / m) for s, (i, m) in ISIC_TASK1_FOLDERS.items() if (root / i).is_dir() or (root / m).is_dir()}
    if "train" not in present:
        raise missing("isic2018_task1", root, f"{ISIC_TASK1_FOLDERS['train'][0]}/ and {ISIC_TASK1_FOLDERS['train'][1]}/")
    issues: list[ReadIssue] = []
    records: list[Record] = []
    for split, (image_dir, mask_dir) in present.items():
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                issues.append(ReadIssue(str(folder), "missing folder"))
        pairs = pair_by_id(_isic_images(image_dir), _masks(mask_dir), issues)
        official = split if len(present) > 1 else ""
        records += [Record(k, i, m, split=official, meta={"official_split": split}) for k, i, m in pairs]
    records = limit(apply_splits(records, options), options.max_samples)
    good = verify_files(((r.id, r.image_path, r.mask_path) for r in records), options, issues)
    records = [r for r in records if r.id in good]
    return finish(Dataset("isic2018_task1", root, records, issues=issues,
                          description="ISIC 2018 Task 1 lesion segmentation (image + binary lesion mask)"), options)


def _onehot_label(row: pd.Series, path: Path, issues: list[ReadIssue]) -> str:
    values = row[list(TASK3_COLUMNS)].to_numpy(dtype=float)
    if not np.isclose(values.sum(), 1.0) or not np.isin(values, (0.0, 1.0)).all():
        issues.append(ReadIssue(f"{path}:{row['image']}", f"invalid one-hot row {values.tolist()}"))
        return ""
    return HAM_CLASSES[int(values.argmax())]


def _read_ham_metadata(root: Path) -> pd.DataFrame | None:
    path = first_existing(root / "HAM10000_metadata.csv", root / "HAM10000_metadata", root / "HAM10000_metadata.tab")
    if path is None:
        return None
    return pd.read_csv(path, sep="\t" if path.suffix == ".tab" else ",", dtype={"lesion_id": str, "image_id": str})


def _ham_images(root: Path, isic_root: Path | None = None) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for name in HAM_IMAGE_FOLDERS:
        images.update(_isic_images(root / name))
    if isic_root is not None:
        images.update(_isic_images(isic_root / "ISIC2018_Task3_Training_Input"))
    return images


def _meta_from_row(row: pd.Series, skip: tuple[str, ...]) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items() if k not in skip}


def read_ham10000(root: Path, options: ReadOptions, isic_root: Path | None = None) -> Dataset:
    """HAM10000: ``HAM10000_metadata.csv`` (lesion_id, image_id, dx, ...) plus images when present.

    Images are looked up in ``HAM10000_images[_part_1|_part_2]/`` (and ISIC 2018 Task 3 training input);
    expert lesion masks (Tschandl et al. 2020) in ``HAM10000_segmentations_lesion_tschandl/``.
    Seeded split grouped by ``lesion_id`` so no lesion straddles two splits.
    """
    meta = _read_ham_metadata(root)
    if meta is None:
        raise missing("ham10000", root, "HAM10000_metadata.csv")
    issues: list[ReadIssue] = []
    images, masks = _ham_images(root, isic_root), _masks(root / HAM_MASK_FOLDER)
    known = set(meta["image_id"])
    for key in sorted((set(images) | set(masks)) - known):
        issues.append(ReadIssue(str(images.get(key) or masks[key]), "file not in HAM10000_metadata.csv"))
    records = []
    for row in meta.itertuples(index=False):
        rowd = row._asdict()
        dx = str(rowd["dx"]).lower()
        if dx not in HAM_CLASSES:
            issues.append(ReadIssue(f"HAM10000_metadata.csv:{rowd['image_id']}", f"unknown diagnosis {dx!r}"))
            continue
        records.append(Record(rowd["image_id"], images.get(rowd["image_id"]), masks.get(rowd["image_id"]), label=dx,
                              meta=_meta_from_row(pd.Series(rowd), ("image_id", "dx"))))
    for key, mask in masks.items():
        if key in known and key not in images:
            issues.append(ReadIssue(str(mask), "mask without image"))
    records = limit(apply_splits(records, options, group_key="lesion_id"), options.max_samples)
    with_files = [(r.id, r.image_path, r.mask_path) for r in records if r.image_path is not None]
    good = verify_files(with_files, options, issues)
    checked = {k for k, _, _ in with_files}
    records = [r for r in records if r.id not in checked or r.id in good]
    return finish(Dataset("ham10000", root, records, issues=issues, classes=HAM_CLASSES,
                          description="HAM10000 dermoscopic images with 7 diagnoses (= ISIC 2018 Task 3 training)"), options)


def read_ham10000_segmentation(root: Path, options: ReadOptions, isic_root: Path | None = None) -> Dataset:
    """HAM10000 images with the expert lesion masks (thesis §5.5.4): only ids that have a mask."""
    if not (root / HAM_MASK_FOLDER).is_dir():
        raise missing("ham10000_segmentation", root, f"{HAM_MASK_FOLDER}/ and HAM10000 images")
    issues: list[ReadIssue] = []
    images, masks = _ham_images(root, isic_root), _masks(root / HAM_MASK_FOLDER)
    meta = _read_ham_metadata(root)
    by_id = {} if meta is None else {r["image_id"]: r for r in meta.to_dict("records")}
    pairs = pair_by_id({k: v for k, v in images.items() if k in masks}, masks, issues)
    records = [Record(k, i, m, label=str(by_id.get(k, {}).get("dx", "")).lower(),
                      meta=_meta_from_row(pd.Series(by_id.get(k, {})), ("image_id", "dx"))) for k, i, m in pairs]
    records = limit(apply_splits(records, options, group_key="lesion_id"), options.max_samples)
    good = verify_files(((r.id, r.image_path, r.mask_path) for r in records), options, issues)
    return finish(Dataset("ham10000_segmentation", root, [r for r in records if r.id in good], issues=issues,
                          classes=HAM_CLASSES, description="HAM10000 images with expert lesion masks"), options)


def _task3_csv(root: Path, split: str) -> Path | None:
    name = f"ISIC2018_Task3_{ISIC_TASK3_NAMES[split]}_GroundTruth"
    return first_existing(root / name / f"{name}.csv", root / f"{name}.csv")


def read_isic2018_task3(root: Path, options: ReadOptions, ham_root: Path | None = None) -> Dataset:
    """ISIC 2018 Task 3: one-hot ground-truth CSVs (image, MEL, NV, BCC, AKIEC, BKL, DF, VASC), images when present.

    Official splits. The training labels come from ``ISIC2018_Task3_Training_GroundTruth.csv`` or,
    when only HAM10000 is on disk, from its ``dx`` column (Task 3 training = HAM10000).
    """
    issues: list[ReadIssue] = []
    records: list[Record] = []
    for split in ("train", "val", "test"):
        path = _task3_csv(root, split)
        images = _isic_images(root / f"ISIC2018_Task3_{ISIC_TASK3_NAMES[split]}_Input")
        if split == "train" and ham_root is not None:
            images = {**_ham_images(ham_root), **images}
        if path is None:
            if split == "train" and ham_root is not None and _read_ham_metadata(ham_root) is not None:
                ham = _read_ham_metadata(ham_root)
                records += [Record(r.image_id, images.get(r.image_id), label=str(r.dx).lower(), split="train",
                                   labels={c: float(str(r.dx).upper() == c) for c in TASK3_COLUMNS},
                                   meta={"lesion_id": r.lesion_id, "labels_from": "HAM10000_metadata.csv"})
                            for r in ham.itertuples(index=False)]
            continue
        table = pd.read_csv(path, dtype={"image": str})
        for _, row in table.iterrows():
            label = _onehot_label(row, path, issues)
            if label:
                records.append(Record(row["image"], images.get(row["image"]), label=label, split=split,
                                      labels={c: float(row[c]) for c in TASK3_COLUMNS}, meta={"labels_from": path.name}))
    if not records:
        raise missing("isic2018_task3", root, "ISIC2018_Task3_*_GroundTruth.csv (or HAM10000_metadata.csv)")
    records = limit(records, options.max_samples)
    with_files = [(r.id, r.image_path, None) for r in records if r.image_path is not None]
    good = verify_files(with_files, options, issues)
    checked = {k for k, _, _ in with_files}
    records = [r for r in records if r.id not in checked or r.id in good]
    return finish(Dataset("isic2018_task3", root, records, issues=issues, classes=HAM_CLASSES,
                          description="ISIC 2018 Task 3 diagnosis labels (7 classes), official splits"), options)


PH2_IMAGES = "PH2 Dataset images"


def _ph2_table(root: Path) -> dict[str, str]:
    """IMD id -> clinical diagnosis from ``PH2_dataset.xlsx`` (X marks) or ``PH2_dataset.txt``."""
    xlsx = root / "PH2_dataset.xlsx"
    if xlsx.is_file():
        raw = pd.read_excel(xlsx, header=None, dtype=str)
        header_row = next(i for i, row in raw.iterrows() if any(str(v).strip() == "Image Name" for v in row))
        header = [str(v).strip() for v in raw.iloc[header_row]]
        cols = {name: header.index(title) for name, title in
                zip(PH2_CLASSES, ("Common Nevus", "Atypical Nevus", "Melanoma"))}
        name_col = header.index("Image Name")
        table = {}
        for _, row in raw.iloc[header_row + 1:].iterrows():
            name = str(row.iloc[name_col]).strip()
            if name.startswith("IMD"):
                marked = [c for c, j in cols.items() if str(row.iloc[j]).strip().upper() == "X"]
                table[name] = marked[0] if len(marked) == 1 else ""
        return table
    txt = root / "PH2_dataset.txt"
    if txt.is_file():
        table = {}
        for line in txt.read_text(encoding="latin-1").splitlines():
            cells = [c.strip() for c in line.replace("||", "\t").split("\t") if c.strip()]
            if len(cells) >= 2 and cells[0].startswith("IMD") and cells[1] in "012":
                table[cells[0]] = PH2_CLASSES[int(cells[1])]
        return table
    return {}


def read_ph2(root: Path, options: ReadOptions) -> Dataset:
    """PH2 (Mendonça et al. 2013): ``PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`` and
    ``IMDxxx_lesion/IMDxxx_lesion.bmp``; clinical diagnosis from ``PH2_dataset.xlsx``. All records are
    in the ``test`` split (PH2 is an external segmentation benchmark, thesis §4.4.1).

    A case folder holding only its lesion mask, with no ``IMDxxx_Dermoscopic_Image`` folder at all, is a
    case this copy does not include (a partial copy: the shared samples hold 100 of the 200 images and all
    masks); it is counted in the description, not reported as an issue. An image folder without its image,
    or an image without its mask, is a defect and stays an issue."""
    folder = root / PH2_IMAGES
    if not folder.is_dir():
        raise missing("ph2", root, f"'{PH2_IMAGES}/IMDxxx/' folders")
    issues: list[ReadIssue] = []
    images, masks = {}, {}
    absent = 0
    for case in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("IMD")):
        image = case / f"{case.name}_Dermoscopic_Image" / f"{case.name}.bmp"
        mask = case / f"{case.name}_lesion" / f"{case.name}_lesion.bmp"
        if mask.is_file() and not image.parent.exists():
            absent += 1
            continue
        if image.is_file():
            images[case.name] = image
        if mask.is_file():
            masks[case.name] = mask
        if not image.is_file() and not mask.is_file():
            issues.append(ReadIssue(str(case), "case folder without image or lesion mask"))
    table = _ph2_table(root)
    pairs = pair_by_id(images, masks, issues)
    records = [Record(k, i, m, label=table.get(k, ""), split="test") for k, i, m in pairs]
    for r in records:
        if not r.label:
            issues.append(ReadIssue(str(r.image_path), "no clinical diagnosis in PH2_dataset.xlsx/.txt (kept, unlabelled)"))
    records = limit(records, options.max_samples)
    good = verify_files(((r.id, r.image_path, r.mask_path) for r in records), options, issues)
    description = "PH2 dermoscopic images with lesion masks (external test set)"
    if absent:
        description += f"; {absent} case(s) with a lesion mask but no image folder are not in this copy"
    return finish(Dataset("ph2", root, [r for r in records if r.id in good], issues=issues, classes=PH2_CLASSES,
                          description=description), options)


def _derm7pt_group(diagnosis: str) -> str:
    d = diagnosis.lower()
    return "melanoma" if "melanoma" in d else "nevus" if "nevus" in d else "other"


def read_derm7pt(root: Path, options: ReadOptions) -> Dataset:
    """Derm7pt (Kawahara et al. 2018): ``meta/meta.csv`` + ``meta/{train,valid,test}_indexes.csv``
    (row positions in meta.csv); dermoscopic images under ``images/<derm column>`` when present.
    ``label`` is the diagnosis group (melanoma / nevus / other); ``meta['diagnosis']`` the full name."""
    meta_path = root / "meta" / "meta.csv"
    if not meta_path.is_file():
        raise missing("derm7pt", root, "meta/meta.csv")
    issues: list[ReadIssue] = []
    meta = pd.read_csv(meta_path)
    split_of: dict[int, str] = {}
    for split, file in (("train", "train_indexes.csv"), ("val", "valid_indexes.csv"), ("test", "test_indexes.csv")):
        path = root / "meta" / file
        if path.is_file():
            for index in pd.read_csv(path)["indexes"].astype(int):
                split_of[index] = split
        else:
            issues.append(ReadIssue(str(path), "missing index file (records get a seeded split)"))
    records = []
    for position, row in meta.iterrows():
        image = root / "images" / str(row["derm"])
        records.append(Record(f"case{int(row['case_num']):04d}", image if image.is_file() else None,
                              label=_derm7pt_group(str(row["diagnosis"])), split=split_of.get(int(position), ""),
                              meta=_meta_from_row(row, ())))
    records = limit(apply_splits(records, options), options.max_samples)
    with_files = [(r.id, r.image_path, None) for r in records if r.image_path is not None]
    good = verify_files(with_files, options, issues)
    checked = {k for k, _, _ in with_files}
    return finish(Dataset("derm7pt", root, [r for r in records if r.id not in checked or r.id in good], issues=issues,
                          classes=("melanoma", "nevus", "other"),
                          description="Derm7pt dermoscopic cases with diagnosis and 7-point criteria"), options)


def read_fitzpatrick17k(root: Path, options: ReadOptions) -> Dataset:
    """Fitzpatrick17k (Groh et al. 2021): ``fitzpatrick17k.csv``; images ``images/<md5hash>.jpg`` when present.
    ``label`` is the Fitzpatrick type "1".."6" ("unknown" for -1); seeded split."""
    path = root / "fitzpatrick17k.csv"
    if not path.is_file():
        raise missing("fitzpatrick17k", root, "fitzpatrick17k.csv")
    issues: list[ReadIssue] = []
    table = pd.read_csv(path, dtype={"md5hash": str})
    images = list_files(root / "images")
    records = [Record(r["md5hash"], images.get(r["md5hash"]),
                      label=str(int(r["fitzpatrick_scale"])) if 1 <= r["fitzpatrick_scale"] <= 6 else "unknown",
                      meta=_meta_from_row(r, ("md5hash",))) for r in table.to_dict("records")]
    records = limit(apply_splits(records, options), options.max_samples)
    with_files = [(r.id, r.image_path, None) for r in records if r.image_path is not None]
    good = verify_files(with_files, options, issues)
    checked = {k for k, _, _ in with_files}
    return finish(Dataset("fitzpatrick17k", root, [r for r in records if r.id not in checked or r.id in good],
                          issues=issues, classes=("1", "2", "3", "4", "5", "6", "unknown"),
                          description="Fitzpatrick17k clinical images with Fitzpatrick skin type"), options)


def read_ddi(root: Path, options: ReadOptions) -> Dataset:
    """DDI (Daneshjou et al. 2022): ``ddi_metadata.csv`` (DDI_file, skin_tone 12/34/56, malignant, disease);
    images beside it or in ``images/`` when present. ``label`` is the aggregated Fitzpatrick group; all test."""
    path = root / "ddi_metadata.csv"
    if not path.is_file():
        raise missing("ddi", root, "ddi_metadata.csv")
    issues: list[ReadIssue] = []
    table = pd.read_csv(path, index_col=0)
    images = {**list_files(root), **list_files(root / "images")}
    group = {12: "I-II", 34: "III-IV", 56: "V-VI"}
    records = []
    for r in table.to_dict("records"):
        stem = Path(str(r["DDI_file"])).stem
        if int(r["skin_tone"]) not in group:
            issues.append(ReadIssue(f"{path}:{r['DDI_file']}", f"unknown skin_tone {r['skin_tone']!r}"))
            continue
        records.append(Record(stem, images.get(stem), label=group[int(r["skin_tone"])], split="test",
                              meta=_meta_from_row(pd.Series(r), ())))
    records = limit(records, options.max_samples)
    with_files = [(r.id, r.image_path, None) for r in records if r.image_path is not None]
    good = verify_files(with_files, options, issues)
    checked = {k for k, _, _ in with_files}
    return finish(Dataset("ddi", root, [r for r in records if r.id not in checked or r.id in good], issues=issues,
                          classes=FST_GROUPS, description="Diverse Dermatology Images with aggregated skin tone"), options)


def read_dermamnist(root: Path, options: ReadOptions) -> Dataset:
    """DermaMNIST (MedMNIST v2) as files: ``images/DermaMNIST_{train,val,test}_NNNNN.jpg`` + ``labels.csv``."""
    path = root / "labels.csv"
    if not path.is_file():
        raise missing("dermamnist", root, "labels.csv and images/")
    issues: list[ReadIssue] = []
    table = pd.read_csv(path, dtype=str)
    images = list_files(root / "images")
    for key in sorted(set(images) - set(table["image_id"])):
        issues.append(ReadIssue(str(images[key]), "image not in labels.csv"))
    records = []
    for r in table.to_dict("records"):
        split = r["image_id"].split("_")[1] if r["image_id"].count("_") >= 2 else ""
        records.append(Record(r["image_id"], images.get(r["image_id"]), label=r["dx"],
                              split=split if split in ("train", "val", "test") else "",
                              meta={"lesion_id": r.get("lesion_id", "")}))
    records = limit(apply_splits(records, options), options.max_samples)
    with_files = [(r.id, r.image_path, None) for r in records if r.image_path is not None]
    good = verify_files(with_files, options, issues)
    checked = {k for k, _, _ in with_files}
    return finish(Dataset("dermamnist", root, [r for r in records if r.id not in checked or r.id in good],
                          issues=issues, classes=HAM_CLASSES, description="DermaMNIST (HAM10000 at 28x28)"), options)
