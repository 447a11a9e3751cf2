"""The cached-model folder helpers and the one image-to-tensor conversion."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctrlgen.data.tensors import image_tensor
from ctrlgen.models import cache


def test_image_tensor_scales_uint8_and_unit_floats_the_same_way():
    img = np.array([[[0, 255, 51]]], dtype=np.uint8)  # one pixel, HWC
    signed = image_tensor(img)
    assert signed.shape == (1, 3, 1, 1)
    assert torch.allclose(signed.flatten(), torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))
    assert torch.allclose(image_tensor(img.astype(np.float32) / 255), signed)
    assert torch.allclose(image_tensor(img, signed=False).flatten(), torch.tensor([0.0, 1.0, 0.2]))
    chw = np.zeros((2, 3, 5, 5), np.float32)
    assert image_tensor(chw).shape == (2, 3, 5, 5)
    with pytest.raises(ValueError, match="3 colour channels"):
        image_tensor(np.zeros((2, 4, 5, 5), np.uint8))


def test_key_hash_ignores_dict_order_and_sees_values():
    assert cache.key_hash({"a": 1, "b": [1, 2]}) == cache.key_hash({"b": [1, 2], "a": 1})
    assert cache.key_hash({"a": 1}) != cache.key_hash({"a": 2})
    assert len(cache.key_hash({})) == 16


def test_save_folder_publishes_whole_and_cached_record_checks_key_and_content(tmp_path):
    folder = tmp_path / "models" / "m"
    work = cache.work_dir(tmp_path / "models", "m-k1")
    (work / "checkpoint").write_text("x")
    cache.save_folder(folder, lambda tmp: (tmp / "weights").write_text("v1"), "rec.json", {"key": "k1"}, work)
    assert (folder / "weights").read_text() == "v1" and not work.exists()
    assert cache.cached_record(folder, "rec.json", "k1", "weights") == {"key": "k1"}
    assert cache.cached_record(folder, "rec.json", "k2") is None           # another key: retrain
    assert cache.cached_record(folder, "rec.json", "k1", "unet") is None   # incomplete folder: retrain
    cache.save_folder(folder, lambda tmp: (tmp / "weights").write_text("v2"), "rec.json", {"key": "k2"})
    assert (folder / "weights").read_text() == "v2"
    assert json.loads((folder / "rec.json").read_text())["key"] == "k2"
    assert sorted(p.name for p in folder.parent.iterdir()) == [".work", "m"]  # no temporary or old folder left
    (folder / "rec.json").write_text("{broken")
    assert cache.cached_record(folder, "rec.json", "k2") is None


def test_work_dir_fresh_discards_old_checkpoints(tmp_path):
    work = cache.work_dir(tmp_path, "run")
    (work / "checkpoint-5").mkdir()
    assert (cache.work_dir(tmp_path, "run") / "checkpoint-5").exists()
    assert not (cache.work_dir(tmp_path, "run", fresh=True) / "checkpoint-5").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_published_model_folders_and_checkpoints_get_the_umask_permissions(tmp_path, umask):
    import os

    from safetensors.torch import save_file

    from ctrlgen.training.checkpoint import save_checkpoint

    old = os.umask(umask)
    try:
        folder = tmp_path / "models" / "m"
        def write(tmp):  # safetensors writes 0600 files itself (so does diffusers' save_pretrained)
            (tmp / "unet").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "unet" / "weights.safetensors"))

        cache.save_folder(folder, write, "rec.json", {"key": "k1"})
        ckpt = save_checkpoint(tmp_path / "run", 3, {"w": torch.zeros(2)}, {"lr": 1.0})
    finally:
        os.umask(old)
    folder_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask  # 0755/0644 under 022; mkdtemp would give 0700
    assert folder.stat().st_mode & 0o777 == folder_mode and ckpt.stat().st_mode & 0o777 == folder_mode
    assert (folder / "unet").stat().st_mode & 0o777 == folder_mode
    assert (folder / "unet" / "weights.safetensors").stat().st_mode & 0o777 == file_mode
    assert (folder / "rec.json").stat().st_mode & 0o777 == file_mode
    assert (ckpt / "trainable.safetensors").stat().st_mode & 0o777 == file_mode


def test_code_version_ignores_comments_docstrings_and_layout_but_sees_code(tmp_path, monkeypatch):
    """A reworded docstring or comment keeps a model's key; a changed constant or operator changes it."""
    monkeypatch.setattr(cache, "LIB_ROOT", tmp_path)
    original = '"""Module doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 1  # why\n'
    cosmetic = '"""Another module doc."""\n\n\ndef f(x):\n    """Reworded."""\n    # a new comment\n    return (x\n            + 1)\n'
    versions = {}
    for name, text in {"original": original, "cosmetic": cosmetic, "constant": original.replace("+ 1", "+ 2"),
                       "operator": original.replace("x + 1", "x - 1"),
                       "doc_only_body": '"""Module doc."""\n\ndef f(x):\n    """Doc."""\n'}.items():
        (tmp_path / "m.py").write_text(text)
        versions[name] = cache.code_version(["m.py"])
    assert versions["cosmetic"] == versions["original"]
    assert len({versions[k] for k in ("original", "constant", "operator", "doc_only_body")}) == 4
    (tmp_path / "rules.yaml").write_text("a: 1\n")  # not Python: raw bytes count
    before = cache.code_version(["rules.yaml"])
    (tmp_path / "rules.yaml").write_text("a: 1  # comment\n")
    assert cache.code_version(["rules.yaml"]) != before
