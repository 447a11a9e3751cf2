"""Write generated dermoscopy scenes in the official ISIC 2018 Task 1, HAM10000 / Task 3 and PH2 layouts."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from ctrlgen.data.imageio import _atomic_write, write_csv, write_image
from ctrlgen.data.readers.derm import (
    HAM_CLASSES, HAM_IMAGE_FOLDERS, HAM_MASK_FOLDER, ISIC_TASK1_FOLDERS, PH2_IMAGES, TASK3_COLUMNS,
)
from ctrlgen.data.worlds.dermoscopy import DermScenes

HAM_FIRST_ID = 24306       # HAM10000 image ids start at ISIC_0024306
TASK3_VAL_FIRST_ID = 34321  # ISIC 2018 Task 3 validation ids start at ISIC_0034321
TASK3_TEST_FIRST_ID = 34524
LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "neck", "scalp")


def isic_id(number: int) -> str:
    return f"ISIC_{number:07d}"


def write_isic2018_task1(root: Path, scenes: DermScenes, first_id: int = 0) -> list[str]:
    """``ISIC2018_Task1-2_Training_Input/ISIC_x.jpg`` + ``ISIC2018_Task1_Training_GroundTruth/ISIC_x_segmentation.png``."""
    image_dir, mask_dir = (root / f for f in ISIC_TASK1_FOLDERS["train"])
    ids = [isic_id(first_id + i) for i in range(len(scenes.images))]
    for key, image, mask in zip(ids, scenes.images, scenes.masks):
        write_image(image_dir / f"{key}.jpg", image)
        write_image(mask_dir / f"{key}_segmentation.png", mask)
    return ids


def _onehot(dx: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({c: (dx == c.lower()).astype(float) for c in TASK3_COLUMNS})


def write_ham10000(ham_root: Path, isic_root: Path, scenes: DermScenes, seed: int,
                   val_fraction: float = 0.1, test_fraction: float = 0.1) -> list[str]:
    """HAM10000 (metadata CSV, images, Tschandl lesion masks) for the first part of ``scenes`` and the
    ISIC 2018 Task 3 ground-truth CSVs: training = the HAM10000 part, validation / test = the rest
    (their images in ``ISIC2018_Task3_{Validation,Test}_Input``)."""
    rng = np.random.default_rng([seed, 7])
    n = len(scenes.images)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    n_train = n - n_val - n_test
    dx = scenes.truth["dx"].to_numpy(str)
    ids = [isic_id(HAM_FIRST_ID + i) for i in range(n_train)]
    # about a fifth of the lesions were imaged twice (HAM10000 has 7470 lesions for 10015 images)
    lesion, current = [], -1
    for i in range(n_train):
        if i == 0 or dx[i] != dx[i - 1] or rng.uniform() > 0.25:
            current += 1
        lesion.append(f"HAM_{current:07d}")
    meta = pd.DataFrame({
        "lesion_id": lesion, "image_id": ids, "dx": dx[:n_train],
        "dx_type": rng.choice(["histo", "follow_up", "consensus", "confocal"], n_train, p=[0.53, 0.37, 0.09, 0.01]),
        "age": (5 * np.round(np.clip(rng.normal(52, 17, n_train), 0, 85) / 5)).astype(float),
        "sex": rng.choice(["male", "female"], n_train), "localization": rng.choice(LOCALIZATIONS, n_train),
    })
    write_csv(ham_root / "HAM10000_metadata.csv", meta)
    for i, key in enumerate(ids):
        write_image(ham_root / HAM_IMAGE_FOLDERS[0] / f"{key}.jpg", scenes.images[i])
        write_image(ham_root / HAM_MASK_FOLDER / f"{key}_segmentation.png", scenes.masks[i])
    write_csv(isic_root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
              pd.concat([pd.DataFrame({"image": ids}), _onehot(dx[:n_train])], axis=1))
    start = n_train
    for split, first, count in (("Validation", TASK3_VAL_FIRST_ID, n_val), ("Test", TASK3_TEST_FIRST_ID, n_test)):
        part = [isic_id(first + i) for i in range(count)]
        for i, key in enumerate(part):
            write_image(isic_root / f"ISIC2018_Task3_{split}_Input" / f"{key}.jpg", scenes.images[start + i])
        name = f"ISIC2018_Task3_{split}_GroundTruth"
        write_csv(isic_root / name / f"{name}.csv",
                  pd.concat([pd.DataFrame({"image": part}), _onehot(dx[start:start + count])], axis=1))
        ids += part
        start += count
    return ids


def ph2_labels(truth: pd.DataFrame) -> np.ndarray:
    """PH2 clinical diagnosis of generated scenes: melanoma; nevi split at the median irregularity."""
    irregular = truth["irregularity"] > truth["irregularity"].median()
    return np.where(truth["dx"] == "mel", "melanoma", np.where(irregular, "atypical_nevus", "common_nevus"))


def write_ph2(root: Path, scenes: DermScenes) -> list[str]:
    """``PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp``, ``IMDxxx_lesion/IMDxxx_lesion.bmp``
    and ``PH2_dataset.xlsx`` with X marks under Common Nevus / Atypical Nevus / Melanoma."""
    ids = [f"IMD{i + 2:03d}" for i in range(len(scenes.images))]
    labels = ph2_labels(scenes.truth)
    for key, image, mask in zip(ids, scenes.images, scenes.masks):
        case = root / PH2_IMAGES / key
        write_image(case / f"{key}_Dermoscopic_Image" / f"{key}.bmp", image)
        write_image(case / f"{key}_lesion" / f"{key}_lesion.bmp", mask)
    table = pd.DataFrame({"Image Name": ids, "Histological Diagnosis": ""})
    for title, name in (("Common Nevus", "common_nevus"), ("Atypical Nevus", "atypical_nevus"), ("Melanoma", "melanoma")):
        table[title] = np.where(labels == name, "X", "")
    buffer = io.BytesIO()
    table.to_excel(buffer, index=False)
    _atomic_write(root / "PH2_dataset.xlsx", lambda h: h.write(buffer.getvalue()))
    return ids
