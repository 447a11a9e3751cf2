"""The one entry point chapters call: ``load_dataset(name, cfg)``.

It returns the real dataset when the data root holds it, else the procedural world written in the
same official layout (generated on first use under ``<cache>/data/worlds/``, reused afterwards) and
read by the same reader; ``Dataset.source`` and ``Dataset.provenance`` say which. With
``data.resolution`` > 0 the images and masks are resized once into ``<cache>/data/resized/`` (masks
with nearest neighbour and re-binarised) and the records point at the copies.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from skimage.transform import resize

from ctrlgen.data.imageio import read_image, read_mask, write_csv, write_image
from ctrlgen.data.readers.common import IMAGE_SUFFIXES, ReadOptions
from ctrlgen.data.readers.cxr import read_chexpert_labels
from ctrlgen.data.records import DataError, Dataset, Record
from ctrlgen.data.registry import MULTICONCEPT, SPECS, WORLD_OF, spec
from ctrlgen.data.worlds import derm_layouts as lay
from ctrlgen.data.worlds.cxr import render_cxr, sample_labels, write_anatomy_masks, write_mimic_cxr
from ctrlgen.data.worlds.dermoscopy import DermWorldConfig, generate_dermoscopy
from ctrlgen.data.worlds.multiconcept import write_multiconcept
from ctrlgen.paths import cache_root, data_root, make_public
from ctrlgen.progress import tqdm
from ctrlgen.result_cache import source_digest

WORLD_VERSION = "2"  # bump when a world's output changes without its code changing (2: CXR anatomy masks)
# the files each world's generator runs (paths under lib/ctrlgen): their code is part of the world's key, so a
# changed generator rebuilds the cached world by itself (a manual version bump alone was forgotten once), while
# a comment, a docstring or an unrelated module does not
WORLD_FILES = {
    "derm": ("data/worlds/dermoscopy.py", "data/worlds/derm_layouts.py", "data/worlds/common.py", "data/attributes.py",
             "data/imageio.py", "data/readers/derm.py"),
    "cxr": ("data/worlds/cxr.py", "data/worlds/common.py", "data/splits.py", "data/imageio.py", "data/readers/cxr.py"),
    MULTICONCEPT: ("data/worlds/multiconcept.py", "data/worlds/common.py", "data/imageio.py"),
}


def read_options(cfg: Mapping[str, Any], verify_cache: Path | None = None) -> ReadOptions:
    """ReadOptions from a profile's ``data`` section (seed from the top-level ``seed``)."""
    d = cfg["data"]
    return ReadOptions(seed=int(cfg["seed"]), split_fractions=tuple(d["split_fractions"]), max_samples=int(d["max_samples"]),
                       verify=d["verify"], strict=bool(d["strict"]), verify_cache=verify_cache)


def verify_cache_path(name: str, cfg: Mapping[str, Any]) -> Path:
    """Per-file verdicts of full verification of dataset ``name`` (shared by ``load_dataset`` and ``data check``)."""
    return cache_root(cfg) / "data" / "verified" / f"{name}.json"


def dataset_folder(name: str, cfg: Mapping[str, Any] | None = None, root: Path | None = None) -> Path:
    """Where dataset ``name`` is expected: ``data.locations.<key>`` if set, else ``<data root>/<folder>``."""
    s = spec(name)
    if root is None and cfg is not None:
        custom = str(cfg["data"]["locations"].get(s.location, "") or "")
        if custom:
            return Path(custom).expanduser()
    return (root if root is not None else data_root(cfg)) / s.folder


# ------------------------------------------------------------------ procedural worlds
def _world_settings(world: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    w = cfg["data"]["worlds"][world]
    settings = {k: w[k] for k in w}
    return {**settings, "seed": int(cfg["seed"]), "resolution": int(cfg["data"]["resolution"]) or 64, "version": WORLD_VERSION,
            "code": world_code(world), **({"labels_from": chexpert_label_source(cfg)} if world == "cxr" else {})}


CHEXPERT_LABEL_FILES = ("chexpert_train.csv.gz", "chexpert_train.csv", "CheXpert-v1.0-small/train.csv",
                        "CheXpert-v1.0/train.csv")  # read_chexpert_labels' order


def chexpert_label_source(cfg: Mapping[str, Any]) -> str:
    """Which CheXpert label table the CXR world's label co-occurrence comes from (file and size), or
    "built-in prevalences": part of that world's key, so a table added to the data root rebuilds it."""
    folder = dataset_folder("chexpert", cfg)
    for name in CHEXPERT_LABEL_FILES:
        if (folder / name).is_file():
            return f"{name}:{(folder / name).stat().st_size}"
    return "built-in prevalences"


def world_code(world: str) -> str:
    """The code part of a world's key: its generator files and this module's builders (``source_digest``)."""
    builders = [_build_world] + {"derm": [_build_derm], "cxr": [_build_cxr]}.get(world, [])
    return source_digest(WORLD_FILES[world], [inspect.getsource(f) for f in builders])[:16]


def world_root(world: str, cfg: Mapping[str, Any], build: bool = True) -> Path:
    """Folder of a procedural world (a data root in miniature), keyed by its settings; built if absent."""
    settings = _world_settings(world, cfg)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root(cfg) / "data" / "worlds" / f"{world}-{key}"
    if build and not (folder / "world.json").is_file():
        _build_world(world, settings, folder, cfg)
    return folder


def _build_world(world: str, settings: dict[str, Any], folder: Path, cfg: Mapping[str, Any]) -> None:
    """Generate into a temporary folder beside ``folder`` and move it into place when complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        start = time.perf_counter()
        if world == "derm":
            _build_derm(tmp, settings)
        elif world == "cxr":
            _build_cxr(tmp, settings, cfg)
        elif world == MULTICONCEPT:
            write_multiconcept(tmp / MULTICONCEPT, settings["n_pretrain"], settings["n_customize"],
                               settings["resolution"], settings["seed"], float(settings["bare_object_probability"]))
        else:
            raise KeyError(f"unknown world {world!r}; known: {', '.join(WORLD_OF)}")
        (tmp / "world.json").write_text(json.dumps({**settings, "world": world, "seconds": time.perf_counter() - start}, indent=1))
        make_public(tmp)  # usual umask permissions, not mkdtemp's 0700 nor safetensors' 0600
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_derm(root: Path, settings: dict[str, Any]) -> None:
    config = DermWorldConfig(resolution=settings["resolution"], hair_probability=settings["hair_probability"],
                             vignette_probability=settings["vignette_probability"], texture=settings["texture"])
    seed = settings["seed"]
    truths = []
    task1 = generate_dermoscopy(settings["n_task1"], seed, config)
    ids = lay.write_isic2018_task1(root / "isic2018", task1)
    truths.append(task1.truth.assign(id=ids, dataset="isic2018_task1"))
    ham = generate_dermoscopy(settings["n_ham"], seed + 1, config)
    ids = lay.write_ham10000(root / "ham10000", root / "isic2018", ham, seed)
    truths.append(ham.truth.assign(id=ids, dataset="ham10000"))
    # PH2: another clinic — nevi and melanomas only, lighter skin, larger lesions
    ph2_config = replace(config, class_weights={"nv": 160, "mel": 40}, skin_type_weights=(0.4, 0.4, 0.15, 0.05, 0.0, 0.0))
    ph2 = generate_dermoscopy(settings["n_ph2"], seed + 2, ph2_config, overrides=None)
    ids = lay.write_ph2(root / "ph2" / "PH2Dataset", ph2)
    truths.append(ph2.truth.assign(id=ids, dataset="ph2"))
    write_csv(root / "derm_truth.csv", pd.concat(truths, ignore_index=True))


def chexpert_label_table(cfg: Mapping[str, Any]) -> pd.DataFrame | None:
    """The real CheXpert label table when the data root has one (for label co-occurrence), else None."""
    try:
        return read_chexpert_labels(dataset_folder("chexpert", cfg))
    except DataError:
        return None


def _build_cxr(root: Path, settings: dict[str, Any], cfg: Mapping[str, Any]) -> None:
    table = chexpert_label_table(cfg)
    labels = sample_labels(settings["n_images"], settings["seed"], table)
    images, masks = render_cxr(labels, settings["resolution"], settings["seed"])
    folder = root / SPECS["mimic_cxr"].folder
    meta = write_mimic_cxr(folder, images, labels, settings["seed"])
    anatomy = write_anatomy_masks(root, meta["dicom_id"], masks["anatomy"])
    write_csv(root / "cxr_truth.csv", pd.concat([meta[["dicom_id"]], labels], axis=1).assign(
        labels_from="CheXpert label table" if table is not None else "built-in prevalences", anatomy_mask=anatomy))


def _attach_truth(dataset: Dataset, world: Path) -> Dataset:
    """``meta['truth']``: the world's ground-truth row of each record; for the CXR world also
    ``meta['anatomy_mask']``, the absolute path of its anatomy label map (0 other, 1 lungs, 2 heart)."""
    truth_file = world / ("cxr_truth.csv" if dataset.name == "mimic_cxr" else "derm_truth.csv")
    if not truth_file.is_file():
        return dataset
    table = pd.read_csv(truth_file)
    key = "dicom_id" if "dicom_id" in table else "id"
    by_id = {str(r[key]): r for r in table.to_dict("records")}
    records = []
    for r in dataset.records:
        truth = by_id.get(r.id, {})
        extra = {"anatomy_mask": str(world / truth["anatomy_mask"])} if isinstance(truth.get("anatomy_mask"), str) else {}
        records.append(replace(r, meta={**r.meta, "truth": truth, **extra}))
    dataset.records = records
    return dataset


# ------------------------------------------------------------------ loading
def load_dataset(name: str, cfg: Mapping[str, Any], source: str = "", resolution: int | None = None,
                 require_images: bool = False) -> Dataset:
    """Records of dataset ``name`` for profile ``cfg``.

    ``source``: ``real`` (the data root; DataError if absent), ``procedural`` (the generated world),
    or ``auto`` (real when found — and, with ``require_images``, when it has images on disk — else the
    world); default from ``data.source``. ``resolution`` (default ``data.resolution``; 0 keeps the
    original files) resizes into the cache. Issues (unusable files) are printed once as a summary.
    """
    source = source or cfg["data"]["source"]
    if source not in ("auto", "real", "procedural"):
        raise ValueError(f"source must be auto, real or procedural, got {source!r}")
    options = read_options(cfg, verify_cache_path(name, cfg))
    if name == MULTICONCEPT:
        return load_multiconcept(cfg)
    s = spec(name)
    if s.labels_only:
        raise DataError(f"{name} is a label table, not a dataset of samples: use chexpert_label_table(cfg)")
    why = ""
    dataset = None
    if source in ("auto", "real"):
        folder = dataset_folder(name, cfg)
        try:
            dataset = s.read(folder, options, data_root(cfg))
            dataset.provenance = f"real data at {folder}"
            if require_images and not dataset.with_images():
                why = f"{folder} has {name}'s labels but no images"
                dataset = None
        except DataError as err:
            if source == "real" or not s.world:
                raise
            why = str(err).split(";")[0]
    if dataset is None:
        if not s.world:
            raise DataError(f"{name}: {why}; no procedural world writes this dataset")
        world = world_root(s.world, cfg)
        folder = world / s.folder
        dataset = _attach_truth(s.read(folder, replace(options, verify_cache=None), world), world)
        dataset.source = "procedural"
        dataset.provenance = f"procedural world '{s.world}' at {world}" + (f" (real data not used: {why})" if why else "")
    if dataset.issues:
        print(dataset.issue_summary(limit=10))
    size = int(cfg["data"]["resolution"]) if resolution is None else int(resolution)
    return resize_dataset(dataset, size, cfg) if size > 0 else dataset


def _resized_path(out: Path, record: Record, kind: str) -> Path:
    """``<out>/<kind>/<id>.png``; an id that already ends in an image suffix (NIH ``00000001_000.png``)
    loses it, so the copy is ``00000001_000.png`` and not ``00000001_000.png.png``."""
    stem = record.id[: -len(Path(record.id).suffix)] if Path(record.id).suffix.lower() in IMAGE_SUFFIXES else record.id
    return out / kind / f"{stem}.png"


def resize_dataset(dataset: Dataset, resolution: int, cfg: Mapping[str, Any]) -> Dataset:
    """Square copies at ``resolution`` under ``<cache>/data/resized/`` (cached; written atomically).

    Images: bilinear with anti-aliasing (``skimage.transform.resize``). Masks: nearest neighbour, then
    re-binarised, so a mask stays 0/255. Aspect ratio is not kept (as the 256x256 ISIC copies).
    Files already at the resolution are resized anyway into PNG so every record reads the same way.
    """
    tag = hashlib.sha256(str(dataset.root.resolve()).encode()).hexdigest()[:10]
    out = cache_root(cfg) / "data" / "resized" / f"{dataset.name}-{dataset.source}-{tag}" / str(resolution)
    records = []
    todo = [r for r in dataset.records if r.image_path is not None and not _resized_path(out, r, "images").is_file()]
    for r in tqdm(todo, desc=f"resize {dataset.name} to {resolution}", disable=len(todo) < 200, leave=False):
        image = resize(read_image(r.image_path), (resolution, resolution), order=1, anti_aliasing=True, preserve_range=True)
        write_image(_resized_path(out, r, "images"), np.clip(image + 0.5, 0, 255).astype(np.uint8))
        if r.mask_path is not None:
            mask = resize(read_mask(r.mask_path).astype(np.uint8), (resolution, resolution), order=0,
                          anti_aliasing=False, preserve_range=True) > 0.5
            write_image(_resized_path(out, r, "masks"), mask)
    for r in dataset.records:
        if r.image_path is None:
            records.append(r)
            continue
        mask = _resized_path(out, r, "masks") if r.mask_path is not None else None
        records.append(replace(r, image_path=_resized_path(out, r, "images"), mask_path=mask,
                               meta={**r.meta, "original_image": str(r.image_path)}))
    return replace(dataset, records=records, resolution=resolution)


def _pretrain_items(world: Path) -> list[dict[str, Any]]:
    """The multiconcept world's ``pretrain/captions.jsonl``, one dict per scene (``write_multiconcept``)."""
    return [json.loads(line) for line in (world / "pretrain" / "captions.jsonl").read_text().splitlines()]


def multiconcept_full_captions(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{record id: full_caption}`` of the pretraining scenes, from the caption file alone (``load_multiconcept``
    also lists every scene's masks, which labels do not need)."""
    world = world_root(MULTICONCEPT, cfg) / MULTICONCEPT
    return {Path(item["file"]).stem: item["full_caption"] for item in _pretrain_items(world)}


def load_multiconcept(cfg: Mapping[str, Any]) -> Dataset:
    """Chapter 3's multi-concept scenes (always procedural): split ``pretrain`` (captioned scenes,
    ``meta['masks']`` one mask per object) and ``customize`` (one image per two-concept set,
    ``meta['class_names']``)."""
    world = world_root(MULTICONCEPT, cfg) / MULTICONCEPT
    records = []
    for item in _pretrain_items(world):
        image = world / "pretrain" / item["file"]
        masks = sorted((world / "pretrain" / "masks").glob(f"{image.stem}_*.png"))
        records.append(Record(image.stem, image, text=item["caption"], split="pretrain",
                              meta={"masks": [str(m) for m in masks], "objects": item["objects"],
                                    "full_caption": item["full_caption"]}))
    for folder in sorted(p for p in (world / "customize").iterdir() if p.is_dir()):
        info = json.loads((folder / "concepts.json").read_text())
        records.append(Record(folder.name, folder / "image.png", text=info["caption"], split="customize",
                              meta={"masks": [str(p) for p in sorted(folder.glob("mask_*.png"))],
                                    "class_names": info["class_names"], "concepts": info["concepts"]}))
    return Dataset(MULTICONCEPT, world, records, source="procedural",
                   description="multi-concept toy scenes (shape x colour x texture) with per-object masks",
                   provenance=f"procedural world '{MULTICONCEPT}' at {world}")
