"""Every dataset the thesis uses: where it lives under the data root, how to read it, where to get it,
its licence, and which procedural world stands in for it when it is absent."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctrlgen.data.readers import cxr, derm
from ctrlgen.data.readers.common import ReadOptions
from ctrlgen.data.records import Dataset


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    location: str            # key of profile data.locations, and default folder name under the data root
    folder: str              # default folder relative to the data root
    read: Callable[[Path, ReadOptions, Path], Dataset]  # (folder, options, data root) -> Dataset
    obtain: str              # where to get it
    licence: str
    world: str = ""          # procedural world that writes this layout ("" = none)
    credentialed: bool = False
    expect: str = ""         # what the folder must contain
    labels_only: bool = False  # a label table, not a dataset of samples (check counts rows)


SPECS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("isic2018_task1", "ISIC 2018 Task 1 (lesion segmentation)", "isic2018", "isic2018",
                lambda f, o, r: derm.read_isic2018_task1(f, o),
                "https://challenge.isic-archive.com/data/#2018 (`ctrlgen data fetch isic2018_task1`)", "CC BY-NC 4.0",
                world="derm", expect="ISIC2018_Task1-2_Training_Input/ISIC_*.jpg + ISIC2018_Task1_Training_GroundTruth/ISIC_*_segmentation.png"),
    DatasetSpec("isic2018_task3", "ISIC 2018 Task 3 (7-class diagnosis)", "isic2018", "isic2018",
                lambda f, o, r: derm.read_isic2018_task3(f, o, ham_root=r / "ham10000"),
                "https://challenge.isic-archive.com/data/#2018 (`ctrlgen data fetch isic2018_task3`)", "CC BY-NC 4.0",
                world="derm", expect="ISIC2018_Task3_{Training,Validation,Test}_GroundTruth.csv (+ _Input/ images)"),
    DatasetSpec("ham10000", "HAM10000 (images, diagnoses, metadata)", "ham10000", "ham10000",
                lambda f, o, r: derm.read_ham10000(f, o, isic_root=r / "isic2018"),
                "https://doi.org/10.7910/DVN/DBW86T (Harvard Dataverse); images also via `ctrlgen data fetch ham10000`",
                "CC BY-NC-SA 4.0", world="derm", expect="HAM10000_metadata.csv + HAM10000_images[_part_1|_part_2]/"),
    DatasetSpec("ham10000_segmentation", "HAM10000 expert lesion segmentations", "ham10000", "ham10000",
                lambda f, o, r: derm.read_ham10000_segmentation(f, o, isic_root=r / "isic2018"),
                "https://doi.org/10.7910/DVN/DBW86T (file HAM10000_segmentations_lesion_tschandl.zip)",
                "CC BY-NC-SA 4.0", world="derm", expect="HAM10000_segmentations_lesion_tschandl/ISIC_*_segmentation.png + images"),
    DatasetSpec("ph2", "PH2", "ph2", "ph2/PH2Dataset", lambda f, o, r: derm.read_ph2(f, o),
                "https://www.fc.up.pt/addi/ph2%20database.html (free for research; download and unpack PH2Dataset/)",
                "research use with citation (Mendonça et al. 2013)", world="derm",
                expect="'PH2 Dataset images'/IMDxxx/... + PH2_dataset.xlsx"),
    DatasetSpec("derm7pt", "Derm7pt (7-point criteria)", "derm7pt", "derm7pt", lambda f, o, r: derm.read_derm7pt(f, o),
                "https://derm.cs.sfu.ca/ (registration; images may not be redistributed)", "CC BY-NC-SA 4.0 (meta)",
                expect="meta/meta.csv + meta/*_indexes.csv (+ images/)"),
    DatasetSpec("fitzpatrick17k", "Fitzpatrick17k", "fitzpatrick17k", "fitzpatrick17k",
                lambda f, o, r: derm.read_fitzpatrick17k(f, o),
                "https://github.com/mattgroh/fitzpatrick17k (csv: `ctrlgen data fetch fitzpatrick17k`; images from the URLs in it)",
                "CC BY-NC-SA 3.0", expect="fitzpatrick17k.csv (+ images/<md5hash>.jpg)"),
    DatasetSpec("ddi", "Diverse Dermatology Images (DDI)", "ddi", "ddi", lambda f, o, r: derm.read_ddi(f, o),
                "https://ddi-dataset.github.io/ (Stanford AIMI, sign-in and research-use agreement)",
                "Stanford AIMI research use", credentialed=True, expect="ddi_metadata.csv (+ images)"),
    DatasetSpec("dermamnist", "DermaMNIST (MedMNIST v2)", "dermamnist", "dermamnist",
                lambda f, o, r: derm.read_dermamnist(f, o), "https://medmnist.com/ (dermamnist.npz, written out as labels.csv + images/)",
                "CC BY 4.0 (MedMNIST), CC BY-NC (HAM10000)", expect="labels.csv + images/DermaMNIST_<split>_NNNNN.jpg"),
    DatasetSpec("nih_chestxray14", "NIH ChestX-ray14", "nih_chestxray14", "cxr/nih_chestxray14",
                lambda f, o, r: cxr.read_nih_chestxray14(f, o), "https://nihcc.app.box.com/v/ChestXray-NIHCC",
                "no restriction, attribution required", expect="Data_Entry_2017_v2020.csv + images/"),
    DatasetSpec("iu_xray", "IU X-ray (Open-i)", "iu_xray", "cxr/iu_xray", lambda f, o, r: cxr.read_iu_xray(f, o),
                "https://openi.nlm.nih.gov/faq#collection (R2Gen split: annotation.json)", "research use",
                expect="annotation.json (+ images/<id>/0.png) or indiana_reports.csv"),
    DatasetSpec("mimic_cxr", "MIMIC-CXR-JPG v2.0.0", "mimic_cxr", "cxr/mimic-cxr-jpg",
                lambda f, o, r: cxr.read_mimic_cxr(f, o),
                "https://physionet.org/content/mimic-cxr-jpg/2.0.0/ (credentialed PhysioNet access: CITI training + "
                "data use agreement; reports from https://physionet.org/content/mimic-cxr/2.0.0/ mimic-cxr-reports.zip)",
                "PhysioNet Credentialed Health Data License 1.5.0", world="cxr", credentialed=True,
                expect="mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz + files/pXX/pSUBJECT/sSTUDY/*.jpg + sSTUDY.txt"),
    DatasetSpec("chexpert", "CheXpert labels", "chexpert", "cxr/chexpert", lambda f, o, r: None,  # type: ignore[arg-type]
                "https://stanfordmlgroup.github.io/competitions/chexpert/ (Stanford research-use agreement)",
                "Stanford research use", credentialed=True, labels_only=True,
                expect="chexpert_train.csv.gz or CheXpert-v1.0-small/train.csv"),
)}
MULTICONCEPT = "multiconcept"  # procedural only (chapter 3)
WORLD_OF = {"derm": ("isic2018_task1", "isic2018_task3", "ham10000", "ham10000_segmentation", "ph2"),
            "cxr": ("mimic_cxr",), "multiconcept": (MULTICONCEPT,)}


def spec(name: str) -> DatasetSpec:
    """The spec of a dataset; unknown names raise KeyError listing the known ones."""
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(SPECS)}, {MULTICONCEPT}") from None
