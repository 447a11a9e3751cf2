"""Self-attention diagnostics and image-quality figures against hand-computed cases and reference libraries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrlgen.analysis import affinity_table, head_self_attention, psnr, sample_distance, summarize_affinity
from ctrlgen.attention import AttentionCapture, affinity_ratio, diagonal_mass


def _same_region_attention(labels: torch.Tensor) -> torch.Tensor:
    """Each pixel attends uniformly to the pixels of its own region (a perfect same-region affinity)."""
    flat = labels.reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()
    return same / same.sum(-1, keepdim=True)


def test_affinity_ratio_hand_computed_cases():
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[:1] = 1  # region 1 covers 1/4 of the image, region 0 covers 3/4
    perfect = _same_region_attention(labels)
    # every pixel sends all its mass to its own region: ratio 1/a_r per pixel; mean = (4·4 + 12·4/3)/16 = 2
    assert float(affinity_ratio(perfect, labels)) == pytest.approx(2.0)
    uniform = torch.full((16, 16), 1 / 16)
    assert float(affinity_ratio(uniform, labels)) == pytest.approx(1.0)
    # the identity (attend to oneself only) is also same-region: per pixel 1/a_r -> the same mean
    assert float(affinity_ratio(torch.eye(16), labels)) == pytest.approx(2.0)
    # three regions -> 3.0 for the perfect affinity
    labels3 = labels.clone()
    labels3[3:] = 2
    assert float(affinity_ratio(_same_region_attention(labels3), labels3)) == pytest.approx(3.0)
    # attention entirely to the other region scores 0
    flat = labels.reshape(-1)
    cross = (flat[:, None] != flat[None, :]).float()
    other = cross / cross.sum(-1, keepdim=True)
    assert float(affinity_ratio(other, labels)) == pytest.approx(0.0)
    assert float(diagonal_mass(uniform)) == pytest.approx(1 / 16)


def test_psnr_matches_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ours = psnr(a, b)
    ref = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)]
    assert np.allclose(ours, ref, atol=1e-3)


def test_sample_distance_is_bracketed_for_data_and_noise():
    rng = np.random.default_rng(0)
    # structured "data": a bright square on a dark background with small jitter
    def data(n):
        x = np.full((n, 16, 16, 3), 30, np.uint8)
        for i in range(n):
            o = rng.integers(3, 6)
            x[i, o:o + 8, o:o + 8] = 220
        return x
    train, held = data(40), data(40)
    noise = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    good = sample_distance(data(40), held, train, side=8)
    bad = sample_distance(noise, held, train, side=8)
    assert good["samples"] < bad["samples"]
    assert good["floor (train vs held-out data)"] < good["ceiling (per-pixel Gaussian)"]


@pytest.fixture(scope="module")
def tiny_model():
    from ctrlgen.config import load_profile
    from ctrlgen.models import build_caption_tokenizer, build_mini_components

    cfg = load_profile("smoke")
    tok = build_caption_tokenizer(["an image of a lesion on skin"])
    return build_mini_components(cfg, tok, seed=0).to("cpu")


def test_head_maps_average_to_what_attention_capture_returns(tiny_model):
    unet = tiny_model.unet
    side = unet.config.sample_size
    torch.manual_seed(0)
    z = torch.randn(2, 4, side, side)
    emb = tiny_model.encode_prompt(["an image of a lesion on skin"] * 2)
    maps = head_self_attention(unet, z, 500, emb, res=(side,), places=("down", "mid", "up"))
    assert maps and all(p.shape[1] == l.module.heads for l, p in maps.values())
    with AttentionCapture(unet, cross_res=(), self_res=(side,)) as store, torch.no_grad():
        unet(z, 500, encoder_hidden_states=emb)
    ours = torch.stack([p.mean(1) for _, p in maps.values()]).mean(0)
    assert torch.allclose(ours, store.self_attention(side), atol=1e-5)
    # processors are restored
    assert all(type(l.module.processor).__name__ != "_HeadRecorder" for l, _ in maps.values())


def test_affinity_table_rows(tiny_model):
    side_img = tiny_model.unet.config.sample_size * tiny_model.vae_scale_factor
    torch.manual_seed(0)
    x = torch.rand(3, 3, side_img, side_img) * 2 - 1
    with torch.no_grad():
        z = tiny_model.encode_images(x)
    labels = torch.zeros(3, side_img, side_img, dtype=torch.long)
    labels[:, : side_img // 2] = 1
    labels[2] = 0  # a single-region image is left out
    ids = tiny_model.tokenize(["an image of a lesion on skin"] * 3)
    table = affinity_table(tiny_model, z, ids, labels, t=500, res=(tiny_model.unet.config.sample_size,))
    assert set(table["n_images"]) == {2}
    assert {"mean", "0"} <= set(table["head"]) and (table["place"] == "all").sum() == 1
    assert np.all(table["affinity_ratio"] > 0) and np.all(table["affinity_ratio"] < 2.0 + 1e-6)
    s = summarize_affinity(table)
    assert s["diagonal mass if uniform"] == pytest.approx(1 / tiny_model.unet.config.sample_size ** 2)
