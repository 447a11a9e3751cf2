"""Readers for the chest X-ray datasets (thesis chapter 6 and §2.4): MIMIC-CXR-JPG, NIH ChestX-ray14,
IU X-ray (Open-i; R2Gen split) and the CheXpert label table used for label co-occurrence."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from ctrlgen.data.readers.common import (
    ReadOptions, apply_splits, finish, first_existing, limit, list_files, missing, verify_files,
)
from ctrlgen.data.records import Dataset, ReadIssue, Record

# The 14 CheXpert observations in the CheXpert labeler's order (Irvin et al. 2019).
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
MIMIC_VERSION = "2.0.0"
MIMIC_SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}


def _nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _read_csv_any(*candidates: Path, **kwargs) -> pd.DataFrame | None:
    path = first_existing(*candidates)
    return None if path is None else pd.read_csv(path, **kwargs)


def parse_report_sections(text: str) -> dict[str, str]:
    """Split a free-text radiology report into upper-case-headed sections (``FINDINGS``, ``IMPRESSION``, ...).

    MIMIC-CXR reports head sections with ``NAME:`` at the start of a line; text before the first
    heading goes under ``PREAMBLE``. Whitespace inside a section is collapsed.
    """
    sections: dict[str, str] = {}
    current = "PREAMBLE"
    parts: dict[str, list[str]] = {current: []}
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Z][A-Z /&]+):\s*(.*)$", line)
        if match:
            current = match.group(1).strip()
            parts.setdefault(current, [])
            line = match.group(2)
        parts[current].append(line.strip())
    for name, lines in parts.items():
        body = " ".join(l for l in lines if l).strip()
        if body:
            sections[name] = body
    return sections


def mimic_study_dir(root: Path, subject_id: int, study_id: int) -> Path:
    """``files/pXX/pSUBJECT/sSTUDY`` of the MIMIC-CXR-JPG layout (XX = first two digits of the subject)."""
    subject = f"p{int(subject_id)}"
    return root / "files" / subject[:3] / subject / f"s{int(study_id)}"


def _mimic_report(root: Path, subject_id: int, study_id: int) -> Path | None:
    study = mimic_study_dir(root, subject_id, study_id)
    alt = root.parent / "mimic-cxr-reports" / study.relative_to(root)
    return first_existing(study.with_suffix(".txt"), alt.with_suffix(".txt"))


def read_mimic_cxr(root: Path, options: ReadOptions) -> Dataset:
    """MIMIC-CXR-JPG v2.0.0 (Johnson et al. 2019): ``mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz``,
    images ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` and reports ``files/pXX/pSUBJECT/sSTUDY.txt``
    (from the MIMIC-CXR reports archive; also looked up under ``../mimic-cxr-reports/``).

    One record per image: ``labels`` are the 14 CheXpert observations of its study (1, 0, -1, NaN),
    ``text`` the report, ``meta`` holds the view position and report sections. Official split
    (``validate`` -> ``val``).
    """
    names = {k: root / f"mimic-cxr-{MIMIC_VERSION}-{k}.csv.gz" for k in ("metadata", "chexpert", "split")}
    tables = {k: _read_csv_any(p, p.with_suffix("")) for k, p in names.items()}
    if any(t is None for t in tables.values()):
        raise missing("mimic_cxr", root, ", ".join(p.name for p in names.values()))
    issues: list[ReadIssue] = []
    meta = tables["metadata"].merge(tables["split"][["dicom_id", "split"]], on="dicom_id", how="left")
    labels = tables["chexpert"].set_index(["subject_id", "study_id"])
    records = []
    for row in meta.to_dict("records"):
        key = (int(row["subject_id"]), int(row["study_id"]))
        image = mimic_study_dir(root, *key) / f"{row['dicom_id']}.jpg"
        report = _mimic_report(root, *key)
        if key not in labels.index:
            issues.append(ReadIssue(f"{names['chexpert'].name}:s{key[1]}", "study without CheXpert labels"))
        observed = labels.loc[key] if key in labels.index else pd.Series(dtype=float)
        text = report.read_text(encoding="utf-8", errors="replace") if report else ""
        records.append(Record(
            str(row["dicom_id"]), image if image.is_file() else None,
            labels={c: float(observed.get(c, float("nan"))) for c in CHEXPERT_LABELS}, text=text,
            split=MIMIC_SPLIT_NAMES.get(str(row.get("split")), ""),
            meta={"subject_id": key[0], "study_id": key[1], "view": _nan_to_none(row.get("ViewPosition")),
                  "report_path": str(report) if report else "", "sections": parse_report_sections(text)},
        ))
    for r in records:
        if r.image_path is None:
            issues.append(ReadIssue(str(mimic_study_dir(root, r.meta["subject_id"], r.meta["study_id"]) / f"{r.id}.jpg"),
                                    "image listed in metadata but not on disk"))
    records = limit(apply_splits([r for r in records if r.image_path is not None], options, "subject_id"),
                    options.max_samples)
    good = verify_files(((r.id, r.image_path, None) for r in records), options, issues)
    return finish(Dataset("mimic_cxr", root, [r for r in records if r.id in good], issues=issues,
                          classes=CHEXPERT_LABELS, description="MIMIC-CXR-JPG images, CheXpert labels and reports"), options)


NIH_IMAGE_FOLDERS = ("images", "images_64", *(f"images_{i:03d}/images" for i in range(1, 13)))


def read_nih_chestxray14(root: Path, options: ReadOptions) -> Dataset:
    """NIH ChestX-ray14 (Wang et al. 2017): ``Data_Entry_2017[_v2020].csv[.gz]`` and images in ``images/``
    (or ``images_001/images`` ...). Split from ``train_val_list.txt``/``test_list.txt`` or an
    ``images_64_index.csv``; else seeded by patient. Only rows with an image on disk become records
    when any image folder exists (the label table alone otherwise)."""
    table = _read_csv_any(*(root / f"{n}{s}" for n in ("Data_Entry_2017_v2020", "Data_Entry_2017")
                            for s in (".csv.gz", ".csv")))
    if table is None:
        raise missing("nih_chestxray14", root, "Data_Entry_2017_v2020.csv(.gz)")
    issues: list[ReadIssue] = []
    images: dict[str, Path] = {}
    for folder in NIH_IMAGE_FOLDERS:
        images.update({p.name: p for p in list_files(root / folder, (".png",)).values()})
    split_of: dict[str, str] = {}
    index = _read_csv_any(root / "images_64_index.csv")
    if index is not None:
        split_of = dict(zip(index["Image Index"], index["split"].replace({"valid": "val"})))
    for name, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        if (root / name).is_file():
            split_of.update({l.strip(): split for l in (root / name).read_text().splitlines() if l.strip()})
    known = set(table["Image Index"])
    for name in sorted(set(images) - known):
        issues.append(ReadIssue(str(images[name]), "image not in Data_Entry csv"))
    if images:
        table = table[table["Image Index"].isin(images)]
    records = []
    for row in table.to_dict("records"):
        found = set(str(row["Finding Labels"]).split("|"))
        records.append(Record(row["Image Index"], images.get(row["Image Index"]),
                              label="No Finding" if "No Finding" in found else "abnormal",
                              labels={c: float(c in found) for c in NIH_LABELS}, split=split_of.get(row["Image Index"], ""),
                              meta={"patient_id": row["Patient ID"], "view": row["View Position"],
                                    "age": row["Patient Age"], "sex": row["Patient Gender"]}))
    records = limit(apply_splits(records, options, "patient_id"), options.max_samples)
    good = verify_files(((r.id, r.image_path, None) for r in records if r.image_path), options, issues)
    return finish(Dataset("nih_chestxray14", root, [r for r in records if r.image_path is None or r.id in good],
                          issues=issues, classes=("No Finding", "abnormal"),
                          description="NIH ChestX-ray14 frontal CXRs with 14 finding labels"), options)


def read_iu_xray(root: Path, options: ReadOptions) -> Dataset:
    """IU X-ray / Open-i (Demner-Fushman et al. 2016): the R2Gen ``annotation.json`` split (images
    ``images/<id>/0.png``) when present, else ``indiana_reports.csv`` + ``indiana_projections.csv``
    (images ``images/images_normalized/<filename>``) with a seeded split. ``text`` = the report."""
    annotation = root / "annotation.json"
    issues: list[ReadIssue] = []
    records: list[Record] = []
    if annotation.is_file():
        data = json.loads(annotation.read_text(encoding="utf-8"))
        for split, items in data.items():
            for item in items:
                image = root / "images" / item["image_path"][0] if item.get("image_path") else None
                records.append(Record(item["id"], image if image is not None and image.is_file() else None,
                                      text=item["report"], split={"validation": "val"}.get(split, split),
                                      meta={"image_paths": item.get("image_path", [])}))
    else:
        reports = _read_csv_any(root / "indiana_reports.csv")
        if reports is None:
            raise missing("iu_xray", root, "annotation.json or indiana_reports.csv")
        projections = _read_csv_any(root / "indiana_projections.csv")
        frontal = {} if projections is None else {
            r["uid"]: r["filename"] for r in projections[projections["projection"] == "Frontal"].to_dict("records")}
        for r in reports.to_dict("records"):
            findings, impression = (str(_nan_to_none(r.get(k)) or "") for k in ("findings", "impression"))
            image = root / "images" / "images_normalized" / frontal[r["uid"]] if r["uid"] in frontal else None
            records.append(Record(str(r["uid"]), image if image is not None and image.is_file() else None,
                                  text=" ".join(t for t in (findings, impression) if t),
                                  meta={"findings": findings, "impression": impression,
                                        "mesh": _nan_to_none(r.get("MeSH")), "problems": _nan_to_none(r.get("Problems"))}))
    records = limit(apply_splits(records, options), options.max_samples)
    with_files = [(r.id, r.image_path, None) for r in records if r.image_path is not None]
    good = verify_files(with_files, options, issues)
    checked = {k for k, _, _ in with_files}
    return finish(Dataset("iu_xray", root, [r for r in records if r.id not in checked or r.id in good], issues=issues,
                          description="IU X-ray radiology reports (R2Gen split), images when present"), options)


def read_chexpert_labels(root: Path) -> pd.DataFrame:
    """The CheXpert label table (``chexpert_train.csv[.gz]`` or ``CheXpert-v1.0[-small]/train.csv``):
    one row per image, the 14 observations as floats (1, 0, -1, NaN)."""
    table = _read_csv_any(root / "chexpert_train.csv.gz", root / "chexpert_train.csv",
                          root / "CheXpert-v1.0-small" / "train.csv", root / "CheXpert-v1.0" / "train.csv")
    if table is None:
        raise missing("chexpert", root, "chexpert_train.csv.gz or CheXpert-v1.0-small/train.csv")
    return table[list(CHEXPERT_LABELS)].astype(float)
