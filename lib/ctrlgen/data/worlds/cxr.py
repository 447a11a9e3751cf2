"""Procedural chest X-ray world (thesis chapter 6): frontal CXR-like images whose findings follow
their CheXpert labels, and reports written from the same labels.

Anatomy: thorax, two lung fields with ribs, heart silhouette (patient's left = image right), mediastinum,
spine, clavicles and diaphragm domes. Each of the 14 CheXpert observations changes the image in a
plausible direction (enlarged heart for Cardiomegaly, fluid that blunts the costophrenic angle for
Pleural Effusion, opacities, a nodule, a collapsed lung edge, tubes ...); uncertain (-1) findings are
drawn at half strength. Label combinations are resampled from a real CheXpert label table when one
is on disk (realistic co-occurrence), else drawn from built-in prevalences. Reports have FINDINGS and
IMPRESSION sections with negations ("No pleural effusion.") and uncertainty ("Possible ...").
``write_mimic_cxr`` writes the MIMIC-CXR-JPG v2.0.0 layout; ``write_anatomy_masks`` writes the world's
anatomy label maps (which MIMIC does not have) beside it, as ground truth for region-level measurements.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ctrlgen.data.imageio import write_csv, write_image, write_text
from ctrlgen.data.readers.cxr import CHEXPERT_LABELS, mimic_study_dir
from ctrlgen.data.splits import assign_splits
from ctrlgen.data.worlds.common import draw_curves, grid, smooth_noise

# Approximate CheXpert training prevalences (positive, uncertain); used only without a real label table.
PRIOR = {"Enlarged Cardiomediastinum": (0.05, 0.05), "Cardiomegaly": (0.12, 0.04), "Lung Opacity": (0.47, 0.02),
         "Lung Lesion": (0.04, 0.01), "Edema": (0.23, 0.06), "Consolidation": (0.07, 0.12), "Pneumonia": (0.03, 0.08),
         "Atelectasis": (0.15, 0.15), "Pneumothorax": (0.09, 0.01), "Pleural Effusion": (0.38, 0.05),
         "Pleural Other": (0.02, 0.01), "Fracture": (0.04, 0.003), "Support Devices": (0.52, 0.005)}
FINDINGS = tuple(PRIOR)
SIDES = ("right", "left", "bilateral")
# Values of the anatomy label maps (``render_cxr(...)[1]["anatomy"]``, the world's anatomy PNGs).
ANATOMY_BACKGROUND, ANATOMY_LUNG, ANATOMY_HEART = 0, 1, 2
ANATOMY_CLASSES = ("other", "lung fields", "heart")

POSITIVE = {
    "Enlarged Cardiomediastinum": "The cardiomediastinal silhouette is enlarged.",
    "Cardiomegaly": "The heart is enlarged.", "Lung Opacity": "There is an opacity in the {side} lung.",
    "Lung Lesion": "A nodule is seen in the {side} lung.", "Edema": "There is pulmonary edema.",
    "Consolidation": "There is consolidation in the {side} lower lobe.",
    "Pneumonia": "Findings are consistent with pneumonia.", "Atelectasis": "There is {side} basilar atelectasis.",
    "Pneumothorax": "There is a {side} pneumothorax.", "Pleural Effusion": "There is a {side} pleural effusion.",
    "Pleural Other": "There is {side} pleural thickening.", "Fracture": "A {side} rib fracture is seen.",
    "Support Devices": "An endotracheal tube and an enteric tube are in place.",
}
UNCERTAIN = {
    "Enlarged Cardiomediastinum": "The mediastinum may be widened.", "Cardiomegaly": "The heart is possibly enlarged.",
    "Lung Opacity": "There may be a subtle opacity in the {side} lung.", "Lung Lesion": "A possible {side} lung nodule.",
    "Edema": "Possible mild pulmonary edema.", "Consolidation": "Possible {side} lower lobe consolidation.",
    "Pneumonia": "Pneumonia cannot be excluded.", "Atelectasis": "Possible {side} basilar atelectasis.",
    "Pneumothorax": "A small {side} pneumothorax cannot be excluded.",
    "Pleural Effusion": "Possible small {side} pleural effusion.", "Pleural Other": "Possible {side} pleural thickening.",
    "Fracture": "Possible {side} rib fracture.", "Support Devices": "A possible line is partially seen.",
}
NEGATIVE = {
    "Enlarged Cardiomediastinum": "The mediastinal contours are normal.", "Cardiomegaly": "The heart size is normal.",
    "Lung Opacity": "The lungs are clear.", "Lung Lesion": "There is no lung nodule.",
    "Edema": "There is no pulmonary edema.", "Consolidation": "There is no focal consolidation.",
    "Pneumonia": "There is no pneumonia.", "Atelectasis": "There is no atelectasis.",
    "Pneumothorax": "There is no pneumothorax.", "Pleural Effusion": "There is no pleural effusion.",
    "Pleural Other": "There is no pleural thickening.", "Fracture": "There is no fracture.",
    "Support Devices": "",
}
IMPRESSION = {
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinal silhouette", "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "{side} lung opacity", "Lung Lesion": "{side} lung nodule", "Edema": "pulmonary edema",
    "Consolidation": "{side} lower lobe consolidation", "Pneumonia": "pneumonia", "Atelectasis": "{side} atelectasis",
    "Pneumothorax": "{side} pneumothorax", "Pleural Effusion": "{side} pleural effusion",
    "Pleural Other": "{side} pleural thickening", "Fracture": "{side} rib fracture", "Support Devices": "support devices in place",
}


def sample_labels(n: int, seed: int, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """14 CheXpert labels per image (1, 0, -1, NaN) plus a side for each finding.

    With ``table`` (a real CheXpert label table) whole rows are resampled, keeping the real label
    co-occurrence; otherwise each finding is drawn independently from ``PRIOR``. ``No Finding`` is
    1 exactly when no finding other than Support Devices is positive or uncertain.
    """
    rng = np.random.default_rng([seed, 11])
    if table is not None and len(table):
        labels = table[list(CHEXPERT_LABELS)].iloc[rng.integers(0, len(table), n)].reset_index(drop=True).astype(float)
    else:
        u = rng.uniform(size=(n, len(FINDINGS)))
        pos = np.array([PRIOR[f][0] for f in FINDINGS])
        unc = np.array([PRIOR[f][1] for f in FINDINGS])
        mentioned_negative = rng.uniform(size=u.shape) < 0.35
        values = np.where(u < pos, 1.0, np.where(u < pos + unc, -1.0, np.where(mentioned_negative, 0.0, np.nan)))
        labels = pd.DataFrame(values, columns=FINDINGS)
    present = (labels[[f for f in FINDINGS if f != "Support Devices"]].isin([1.0, -1.0])).any(axis=1)
    labels["No Finding"] = np.where(present, np.nan, 1.0)
    labels = labels[list(CHEXPERT_LABELS)]
    for finding in FINDINGS:
        labels[f"{finding}_side"] = np.asarray(SIDES, dtype=object)[rng.choice(3, n, p=[0.4, 0.35, 0.25])]
    return labels


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _strength(labels: pd.DataFrame, finding: str) -> np.ndarray:
    """1 for positive, 0.5 for uncertain, 0 otherwise; shape (n, 1, 1)."""
    v = labels[finding].to_numpy(float)
    return np.where(v == 1.0, 1.0, np.where(v == -1.0, 0.5, 0.0)).astype(np.float32)[:, None, None]


def _side_weights(labels: pd.DataFrame, finding: str, xx: np.ndarray) -> np.ndarray:
    """Spatial weight of a finding's side: patient's right = image left (PA view)."""
    side = labels[f"{finding}_side"].to_numpy(str)[:, None, None]
    left_half = (xx < 0.5)[None]
    return np.where(side == "bilateral", 1.0, np.where(side == "right", left_half, ~left_half)).astype(np.float32)


def render_cxr(labels: pd.DataFrame, resolution: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Grayscale images (N, H, W) uint8 and anatomy masks for a label table.

    The masks: ``lungs`` and ``heart`` (N, H, W) bool, the shapes as constructed (the lung ellipses
    overlap the mediastinum and heart drawn on top of them), and ``anatomy`` (N, H, W) uint8, the label
    map of what is visible: 2 (``ANATOMY_HEART``) the heart silhouette, 1 (``ANATOMY_LUNG``) the aerated
    lung fields, 0 everything else. Lung fields = ``lungs`` minus the heart and mediastinum drawn over
    them and minus pleural fluid below an effusion's meniscus (opaque, as the lung border a reader
    traces on a radiograph). A pneumothorax stays in the lung field (it is air inside the hemithorax,
    darker still), as do opacities, nodules and ribs. Computing ``anatomy`` draws no random numbers, so
    the images are the same as without it.
    """
    n, s = len(labels), resolution
    rng = np.random.default_rng([seed, 12])
    yy, xx = grid(s, s)
    Y, X = yy[None], xx[None]
    jitter = lambda scale: rng.normal(0, scale, (n, 1, 1)).astype(np.float32)  # noqa: E731
    strength = {f: _strength(labels, f) for f in FINDINGS}
    # thorax and soft tissue
    body = _ellipse(Y, X, 0.58 + jitter(0.01), 0.5, 0.62, 0.46 + jitter(0.015)) < 1
    img = 0.06 + 0.30 * body
    # lungs with diaphragm domes; atelectasis raises the affected base
    base = 0.78 + jitter(0.015)
    lungs = np.zeros((n, s, s), bool)
    for cx, side in ((0.31, X < 0.5), (0.69, X >= 0.5)):
        lift = 0.05 * strength["Atelectasis"] * _side_weights(labels, "Atelectasis", xx) * side
        dome = base - lift - 0.07 * (1 - ((X - cx) / 0.16) ** 2)
        lungs |= (_ellipse(Y, X, 0.47, cx + jitter(0.005), 0.34, 0.165) < 1) & (Y < dome) & side
    ribs = 0.05 * np.clip(np.cos(2 * np.pi * (Y * 9 + 3 * (X - 0.5) ** 2)), 0, 1)
    img = np.where(lungs, 0.12 + ribs, img)
    # mediastinum, spine, clavicles
    width = 0.06 + 0.04 * strength["Enlarged Cardiomediastinum"] + jitter(0.004)
    mediastinum = (np.abs(X - 0.5) < width) & (Y > 0.08) & (Y < 0.62)
    img = np.where(mediastinum, 0.52, img)
    img = img + 0.10 * ((np.abs(X - 0.5) < 0.025) & body)
    for sign in (-1, 1):
        img = img + 0.12 * (np.abs(Y - (0.17 + 0.12 * np.abs(X - 0.5))) < 0.015) * (np.abs(X - 0.5) < 0.3) * (sign * (X - 0.5) > 0)
    # heart (patient's left = image right); cardiomegaly widens it
    heart_w = (0.13 + 0.06 * strength["Cardiomegaly"]) * (1 + jitter(0.03))
    heart = _ellipse(Y, X, 0.64 + jitter(0.01), 0.55, 0.12, heart_w) < 1
    img = np.where(heart, 0.55, img)
    # findings inside the lungs
    noise = smooth_noise(rng, n, s, s, 6)
    lung_f = lungs.astype(np.float32)
    def blob(cy, cx, r):
        return np.exp(-(_ellipse(Y, X, cy, cx, r, r)))
    side_cx = lambda f: np.where(labels[f"{f}_side"].to_numpy(str) == "left", 0.69, 0.31).astype(np.float32)[:, None, None]  # noqa: E731
    effusion_level = base - 0.16 * strength["Pleural Effusion"] + 0.08 * np.abs(X - 0.5)  # meniscus, blunted angle
    fluid = (Y > effusion_level) * _side_weights(labels, "Pleural Effusion", xx) * (strength["Pleural Effusion"] > 0)
    img = img + lung_f * (
        0.30 * fluid * np.minimum(strength["Pleural Effusion"] * 2, 1)
        + 0.16 * strength["Lung Opacity"] * blob(0.45 + jitter(0.08), side_cx("Lung Opacity"), 0.09) * (1 + 0.5 * noise)
        + 0.28 * strength["Consolidation"] * (blob(0.62, side_cx("Consolidation"), 0.08) > 0.4)
        + 0.18 * strength["Pneumonia"] * blob(0.6, side_cx("Pneumonia"), 0.1) * (1 + noise)
        + 0.20 * strength["Edema"] * (blob(0.45, 0.36, 0.12) + blob(0.45, 0.64, 0.12)) + 0.04 * strength["Edema"] * noise
        + 0.22 * strength["Atelectasis"] * (np.abs(Y - (base - 0.1)) < 0.015) * _side_weights(labels, "Atelectasis", xx)
        + 0.35 * strength["Lung Lesion"] * (_ellipse(Y, X, 0.35 + jitter(0.05), side_cx("Lung Lesion") + jitter(0.03), 0.035, 0.035) < 1)
        + 0.18 * strength["Pleural Other"] * (np.abs(np.abs(X - 0.5) - 0.31) < 0.03) * _side_weights(labels, "Pleural Other", xx)
    )
    # pneumothorax: a collapsed lung edge; beyond it no markings (dark)
    ptx = (np.abs(X - side_cx("Pneumothorax")) > 0.10) & (Y < 0.45) & lungs & (strength["Pneumothorax"] > 0)
    ptx &= (_side_weights(labels, "Pneumothorax", xx) > 0) & (np.abs(X - 0.5) > 0.28)
    img = np.where(ptx, 0.04 + 0.06 * (1 - strength["Pneumothorax"]), img)
    # fracture: a short bright offset across a lateral rib; support devices: tubes
    owners = np.flatnonzero(strength["Fracture"][:, 0, 0] > 0)
    cx = np.where(labels["Fracture_side"].to_numpy(str)[owners] == "left", 0.8, 0.2)
    p0 = np.stack([np.full(len(owners), 0.4), cx - 0.04], 1).astype(np.float32)
    p2 = np.stack([np.full(len(owners), 0.44), cx + 0.04], 1).astype(np.float32)
    img = img + 0.2 * draw_curves((n, s, s), owners, p0, (p0 + p2) / 2, p2)
    owners = np.flatnonzero(strength["Support Devices"][:, 0, 0] > 0)
    top = np.tile(np.array([[0.0, 0.5]], np.float32), (len(owners), 1))
    mid = top + np.array([[0.45, 0.02]], np.float32)
    end = top + np.array([[0.95, 0.12]], np.float32)
    img = img + 0.35 * draw_curves((n, s, s), owners, top, mid, end, width_px=1.0 + s / 128)
    img = img + 0.02 * rng.standard_normal((n, s, s)).astype(np.float32)
    anatomy = np.full((n, s, s), ANATOMY_BACKGROUND, np.uint8)
    anatomy[lungs & ~mediastinum & ~(fluid > 0)] = ANATOMY_LUNG
    anatomy[heart] = ANATOMY_HEART
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), {"lungs": lungs, "heart": heart, "anatomy": anatomy}


def _say(template: str, side: str) -> str:
    return template.format(side=side)


def write_report(row: pd.Series) -> str:
    """A MIMIC-style report (FINDINGS, IMPRESSION) from one label row: positives and uncertain findings
    are described, negatives negated, unmentioned (NaN) findings left out."""
    findings, impression = [], []
    for f in FINDINGS:
        value, side = row[f], row[f"{f}_side"]
        if value == 1.0:
            findings.append(_say(POSITIVE[f], side))
            impression.append(_say(IMPRESSION[f], side))
        elif value == -1.0:
            findings.append(_say(UNCERTAIN[f], side))
            impression.append("possible " + _say(IMPRESSION[f], side))
        elif value == 0.0 and NEGATIVE[f]:
            findings.append(NEGATIVE[f])
    if row.get("No Finding") == 1.0 and not any(s.startswith("The lungs are clear") for s in findings):
        findings.append("The lungs are clear.")
    text = "; ".join(impression)
    summary = (text[0].upper() + text[1:] + ".") if text else "No acute cardiopulmonary process."
    return ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
            " INDICATION:  ___ with shortness of breath.\n\n"
            f" FINDINGS: \n \n {' '.join(findings)}\n \n IMPRESSION: \n \n {summary}\n")


def anatomy_mask_name(dicom_id: str) -> str:
    """Path of one image's anatomy label map, relative to the world folder (beside ``cxr_truth.csv``)."""
    return f"cxr_anatomy/{dicom_id}.png"


def write_anatomy_masks(root, dicom_ids, anatomy: np.ndarray) -> list[str]:
    """Write the anatomy label maps (N, H, W) uint8 (0 other, 1 lung fields, 2 heart) as 8-bit
    greyscale PNGs, one per image at the image resolution, under ``root/cxr_anatomy/``. Kept out of
    the MIMIC-CXR layout, which has no masks, so the reader sees exactly the official layout.
    Returns the paths relative to ``root`` (the ``anatomy_mask`` column of ``cxr_truth.csv``)."""

    names = [anatomy_mask_name(str(d)) for d in dicom_ids]
    for name, labels in zip(names, anatomy, strict=True):
        write_image(Path(root) / name, np.asarray(labels, np.uint8))
    return names


def write_mimic_cxr(root, images: np.ndarray, labels: pd.DataFrame, seed: int,
                    split_fractions=(0.8, 0.1, 0.1)) -> pd.DataFrame:
    """Write the MIMIC-CXR-JPG v2.0.0 layout: ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg``, reports
    ``files/pXX/pSUBJECT/sSTUDY.txt`` and ``mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz``.
    One PA image per study; about a third of the subjects have two studies. Returns the metadata."""

    root = Path(root)
    rng = np.random.default_rng([seed, 13])
    n = len(images)
    subject = 10000000 + np.cumsum(np.r_[0, rng.uniform(size=n - 1) > 0.33]) * 17 if n else np.zeros(0, int)
    study = 50000000 + np.arange(n) * 7 + rng.integers(0, 7, n)
    dicom = ["-".join(f"{v:08x}" for v in rng.integers(0, 2**32, 5)) for _ in range(n)]
    split_of = assign_splits([str(s) for s in subject], split_fractions, seed, ("train", "validate", "test"))
    for i in range(n):
        folder = mimic_study_dir(root, subject[i], study[i])
        write_image(folder / f"{dicom[i]}.jpg", images[i])
        write_text(folder.with_suffix(".txt"), write_report(labels.iloc[i]))
    size = images.shape[1] if n else 0
    meta = pd.DataFrame({
        "dicom_id": dicom, "subject_id": subject, "study_id": study,
        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": "PA", "Rows": size, "Columns": size,
        "StudyDate": 21800101 + np.arange(n) % 28, "StudyTime": 120000.0,
        "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)", "ViewCodeSequence_CodeMeaning": "postero-anterior",
        "PatientOrientationCodeSequence_CodeMeaning": "Erect",
    })
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", meta)
    chexpert = pd.concat([meta[["subject_id", "study_id"]], labels[sorted(CHEXPERT_LABELS)]], axis=1)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", chexpert)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame({
        "dicom_id": dicom, "study_id": study, "subject_id": subject, "split": [split_of[str(s)] for s in subject]}))
    return meta
