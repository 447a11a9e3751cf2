"""Bad input gets a name: `ctrlgen data check` decodes fully and lists every bad file; readers and
loads that meet an undecodable image raise one error naming the file; resized NIH copies keep one suffix."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctrlgen.data import imageio
from ctrlgen.cli.data import add_data_parser
from ctrlgen.data.imageio import ImageReadError, read_image, read_mask
from ctrlgen.data.records import DataError, Record

IMAGES, MASKS = "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"


def _save(path: Path, array, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path, **kwargs)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _isic_with_truncated_files(data_root: Path) -> dict[str, Path]:
    """Three pairs in the ISIC 2018 Task 1 layout: one good, one truncated JPEG image, one truncated PNG mask."""
    root = data_root / "isic2018"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3))
    lesion = np.zeros((64, 64), np.uint8)
    lesion[16:40, 16:40] = 255
    files = {}
    for i in range(3):
        files[f"image{i}"] = root / IMAGES / f"ISIC_000000{i}.jpg"
        files[f"mask{i}"] = root / MASKS / f"ISIC_000000{i}_segmentation.png"
        _save(files[f"image{i}"], noise, quality=95)
        _save(files[f"mask{i}"], np.where(np.random.default_rng(i).random((64, 64)) < 0.5, lesion, 255 - lesion))
    _truncate(files["image1"])
    _truncate(files["mask2"])
    return files


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv("CTRLGEN_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("CTRLGEN_CACHE_ROOT", str(tmp_path / "cache"))
    return tmp_path


def test_truncated_files_raise_one_error_naming_the_file(tmp_path):
    files = _isic_with_truncated_files(tmp_path)
    assert read_image(files["image0"]).shape == (64, 64, 3)
    with pytest.raises(ImageReadError, match=r"ISIC_0000001\.jpg: truncated file") as err:
        read_image(files["image1"])
    assert isinstance(err.value, DataError) and err.value.path == str(files["image1"])
    with pytest.raises(ImageReadError, match=r"ISIC_0000002_segmentation\.png: (truncated|unreadable) file"):
        read_mask(files["mask2"])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"text\.png: unreadable file"):
        read_image(tmp_path / "text.png")
    with pytest.raises(ImageReadError, match=r"absent\.png: no such file"):
        Record("x", tmp_path / "absent.png").load_image()


def test_data_check_decodes_fully_lists_every_bad_file_and_caches(roots, capsys, monkeypatch):
    files = _isic_with_truncated_files(roots / "data")
    assert _cli(["data", "check", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "isic2018_task1: 2 file(s) not used:" in out
    assert f"{files['image1']}: truncated file" in out
    assert str(files["mask2"]) in out and str(files["image0"]) not in out.split("not used:")[1]
    # the header-only check does not see a truncated JPEG body
    assert _cli(["data", "check", "--profile", "smoke", "--quick"]) == 0
    assert str(files["image1"]) not in capsys.readouterr().out

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although size and mtime are unchanged")

    monkeypatch.setattr("ctrlgen.data.readers.common.check_image", no_decoding)
    assert _cli(["data", "check", "--profile", "smoke"]) == 0       # every verdict from the cache
    assert f"{files['image1']}: truncated file" in capsys.readouterr().out
    monkeypatch.setattr("ctrlgen.data.readers.common.check_image", imageio.check_image)
    _save(files["image1"], np.zeros((64, 64, 3)), quality=95)       # repaired: new size and mtime
    assert _cli(["data", "check", "--profile", "smoke"]) == 0
    assert "isic2018_task1: 1 file(s) not used:" in capsys.readouterr().out
    # the profile's strict mode turns an unusable file into a failure
    assert _cli(["data", "check", "--profile", "smoke", "-p", "data.strict=true"]) == 1
    assert "data.strict is set and 1 file(s)" in capsys.readouterr().err


def test_data_check_on_a_missing_root_says_so(roots, capsys):
    assert _cli(["data", "check", "--profile", "smoke"]) == 1
    err = capsys.readouterr().err
    assert f"the data root {roots / 'data'} does not exist" in err


def test_loading_without_verification_names_the_bad_file(roots):
    from ctrlgen.config import load_profile
    from ctrlgen.data import load_dataset

    files = _isic_with_truncated_files(roots / "data")
    cfg = load_profile("smoke", {"data.verify": "none", "data.max_samples": 0})
    with pytest.raises(ImageReadError, match=r"ISIC_0000001\.jpg: truncated file"):
        load_dataset("isic2018_task1", cfg, source="real", resolution=32)
    # with full verification the bad pairs are skipped and reported, the good one is resized
    full = load_profile("smoke", {"data.verify": "full", "data.max_samples": 0})
    ds = load_dataset("isic2018_task1", full, source="real", resolution=32)
    assert [r.id for r in ds] == ["ISIC_0000000"] and {Path(i.path).name for i in ds.issues} == {
        files["image1"].name, files["mask2"].name}


def test_resized_nih_copies_have_one_suffix(tmp_path):
    from ctrlgen.data.datasets import _resized_path

    assert _resized_path(tmp_path, Record("00000001_000.png", tmp_path / "x.png"), "images").name == "00000001_000.png"
    assert _resized_path(tmp_path, Record("ISIC_0000000", tmp_path / "x.jpg"), "images").name == "ISIC_0000000.png"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_images_tables_and_worlds_get_the_umask_permissions(tmp_path, umask, monkeypatch):
    import os

    from ctrlgen.data.imageio import write_image, write_json

    old = os.umask(umask)
    try:
        write_image(tmp_path / "a.png", np.zeros((4, 4), bool))
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    for name in ("a.png", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
