"""Image metrics (§4.7.1) against references: the Fréchet closed form, MS-SSIM of identical images,
Eq. (4.17) by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ctrlgen.config import load_profile
from ctrlgen.metrics.image import (
    PerceptualDistance,
    VAEEncoderFeatures,
    fid,
    frechet_distance,
    metric_extractors,
    ms_ssim,
    within_set_diversity,
)
from ctrlgen.models import build_caption_tokenizer, build_mini_components


class Mean4(nn.Module):
    """A fixed feature map: the image's four quadrant means of channel 0 (4 features)."""

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x[:, :1], 2).flatten(1)


def test_fid_zero_on_itself_and_closed_form_on_a_shift():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 4, generator=g) * 0.1 + 0.5
    shift = torch.tensor([0.05, -0.02, 0.0, 0.03])
    fake_f = torch.randn(400, 4, generator=g) * 0.2 + 0.5 + shift
    as_img = lambda f: f.view(-1, 1, 2, 2).repeat(1, 3, 1, 1).repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731
    real, fake = as_img(base), as_img(fake_f)
    assert torch.allclose(Mean4()(real), base, atol=1e-6)
    assert abs(fid(real, real, Mean4())) < 1e-6
    a, b = base.double().numpy(), fake_f.double().numpy()
    ref = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert abs(fid(real, fake, Mean4()) - ref) < 1e-4 * max(1.0, ref)
    # and the population closed form: ||Δμ||² + Σ (σ₁ − σ₂)² = 0.0038 + 4·0.01
    assert abs(ref - (float((shift ** 2).sum()) + 4 * 0.1 ** 2)) < 0.01


def test_ms_ssim_identical_is_one_and_noise_lowers_it():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 64, 64, generator=g)
    assert torch.allclose(ms_ssim(x, x, scales=3), torch.ones(3), atol=1e-5)
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ms_ssim(x, y, scales=3) < 0.9).all()


def test_perceptual_distance_is_eq_4_17_by_hand():
    layers = lambda x: [x, nn.functional.avg_pool2d(x, 2)]  # noqa: E731
    a, b = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    w = [torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.0, 1.0, 1.0])]
    d = PerceptualDistance(layers, w)(a, b)
    unit = lambda f: f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
    ref = sum(((unit(fa) - unit(fb)) ** 2 * wi.view(1, 3, 1, 1)).sum(1).mean((-1, -2))
              for fa, fb, wi in zip(layers(a), layers(b), w))
    assert torch.allclose(d, ref) and torch.allclose(PerceptualDistance(layers)(a, a), torch.zeros(2))
    same = torch.rand(1, 3, 4, 4).expand(4, -1, -1, -1)
    assert within_set_diversity(same, PerceptualDistance(layers)) < 1e-9
    assert within_set_diversity(torch.rand(4, 3, 4, 4), PerceptualDistance(layers)) > 0


def test_profile_extractors_mini_use_the_domain_vae():
    cfg = load_profile("smoke")
    model = build_mini_components(cfg, build_caption_tokenizer(["a lesion"], model_max_length=16))
    feats, dist, text = metric_extractors(cfg, model.vae)
    x = torch.rand(3, 3, 32, 32)
    assert isinstance(feats, VAEEncoderFeatures) and "not Inception" in text
    with torch.no_grad():
        assert feats(x).shape[0] == 3 and float(dist(x, x).abs().max()) < 1e-6
        assert float(dist(x, x.flip(0))[0]) > 0


def test_within_set_diversity_from_cached_features_equals_the_pair_by_pair_mean(monkeypatch):
    import ctrlgen.metrics.image as M

    layers = lambda x: [x, nn.functional.avg_pool2d(x, 2)]  # noqa: E731
    dist = PerceptualDistance(layers, [torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.3, 1.0, 1.0])])
    x = torch.rand(9, 3, 4, 4)
    i, j = np.triu_indices(9, 1)
    by_hand = float(torch.stack([dist(x[a:a + 1], x[b:b + 1])[0] for a, b in zip(i, j)]).mean())
    si, sj = M._pairs(9, 10, 3)  # 10 sampled pairs, seed 3
    sampled_by_hand = float(torch.stack([dist(x[a:a + 1], x[b:b + 1])[0] for a, b in zip(si, sj)]).mean())
    cached = within_set_diversity(x, dist, batch_size=4)
    sampled_cached = within_set_diversity(x, dist, n_pairs=10, seed=3, batch_size=4)
    monkeypatch.setattr(M, "FEATURE_CACHE_BYTES", 0)  # forces the pair-by-pair path
    direct = within_set_diversity(x, dist, batch_size=4)
    sampled_direct = within_set_diversity(x, dist, n_pairs=10, seed=3, batch_size=4)
    assert abs(cached - by_hand) < 1e-6 and abs(direct - by_hand) < 1e-6
    assert abs(sampled_cached - sampled_by_hand) < 1e-6 and abs(sampled_direct - sampled_by_hand) < 1e-6


def test_mask_set_diversity_hand_computed():
    from ctrlgen.metrics.image import mask_set_diversity

    a = np.zeros((4, 4), bool)
    a[:2, :2] = True            # 4 px
    b = np.zeros((4, 4), bool)
    b[:2, :] = True             # 8 px, contains a: IoU 4/8
    c = np.zeros((4, 4), bool)
    c[2:, 2:] = True            # disjoint from a and b: IoU 0
    # pairs (a,b) (a,c) (b,c): 1 - IoU = 0.5, 1, 1
    assert mask_set_diversity(np.stack([a, b, c])) == pytest.approx((0.5 + 1 + 1) / 3)
    assert mask_set_diversity(np.stack([a, a, a])) == 0.0
    assert mask_set_diversity(np.zeros((2, 4, 4), bool)) == 0.0


# ------------------------------------------------------------------------------------------- standard FID / LPIPS
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A stand-in for the FID-Inception weights file, made here (no download): torchvision's Inception3 with the
    FID network's 1008 classes and no aux head (the same keys as torch-fidelity's state dict), random weights whose
    BatchNorm statistics are set from one batch so the 2048-d features are O(1) rather than vanishing."""
    from torchvision.models import Inception3

    torch.manual_seed(0)
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running stats = this batch's stats
            m.reset_running_stats()
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 299, 299) * 2 - 1)
    path = tmp_path_factory.mktemp("fid") / "weights-inception-2015-12-05-test.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_equal_torchmetrics_and_torch_fidelity(inception_file):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ctrlgen.metrics.image import InceptionFeatures

    x = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    as_uint8 = (x * 255).byte()  # torchmetrics' normalize=True conversion
    with torch.no_grad():
        ours = InceptionFeatures(inception_file)(x)
        tm = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(inception_file))
        theirs = tm.inception(as_uint8)
        # torch-fidelity's own forward (its TF1-style resize) against ours with antialias=False
        tf_ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(inception_file))(as_uint8)[0]
        ours_tf = InceptionFeatures(inception_file, antialias=False)(x)
    assert ours.shape == (3, 2048) and float(ours.std(0).mean()) > 0.1  # features that differ between images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_tf, tf_ref, rtol=1e-5, atol=1e-5)
    # the two resizes give different features, so each equality above pins one definition
    assert not torch.allclose(ours, ours_tf, rtol=1e-3, atol=1e-3)


def test_fid_with_inception_equals_torchmetrics_fid(inception_file):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ctrlgen.metrics.image import InceptionFeatures

    g = torch.Generator().manual_seed(3)
    real = torch.rand(5, 3, 32, 32, generator=g) * 0.6
    fake = (torch.rand(5, 3, 32, 32, generator=g) * 0.6 + 0.4).clamp(0, 1)
    ref = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(inception_file))
    ref.update(real, real=True)
    ref.update(fake, real=False)
    expected = float(ref.compute())
    got = fid(real, fake, InceptionFeatures(inception_file), batch_size=2)  # batching must not change it
    assert expected > 1.0 and got == pytest.approx(expected, rel=1e-4)


def test_inception_features_missing_or_wrong_weights_and_bad_range(tmp_path, inception_file):
    from torchvision.models import inception_v3

    from ctrlgen.metrics.image import INCEPTION_WEIGHTS_NAME, InceptionFeatures

    missing = tmp_path / "metrics" / INCEPTION_WEIGHTS_NAME
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")) as err:
        InceptionFeatures(missing)
    assert INCEPTION_WEIGHTS_NAME in str(err.value) and "inception_weights" in str(err.value)
    torchvision_file = tmp_path / "inception_v3_google.pth"  # what the profile named before: the wrong network
    torch.save(inception_v3(weights=None, init_weights=False).state_dict(), torchvision_file)
    with pytest.raises(ValueError, match="not the FID Inception-v3 state dict"):
        InceptionFeatures(torchvision_file)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        InceptionFeatures(inception_file)(torch.full((1, 3, 8, 8), 2.0))


def test_profile_full_names_the_fid_weights_and_errors_offline(tmp_path):
    from ctrlgen.metrics.image import INCEPTION_WEIGHTS_NAME

    cfg = load_profile("full", overrides={"models.root": str(tmp_path)})
    assert cfg["didgen"]["metrics"]["inception_weights"].endswith(INCEPTION_WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / cfg["didgen"]["metrics"]["inception_weights"])):
        metric_extractors(cfg)


def test_alexnet_lpips_equals_torchmetrics_lpips(tmp_path):
    from torchmetrics.functional.image.lpips import _LPIPS
    from torchvision.models import alexnet

    from ctrlgen.metrics.image import alexnet_lpips

    torch.manual_seed(4)
    weights = tmp_path / "alexnet.pth"
    state = alexnet(weights=None).state_dict()
    torch.save(state, weights)
    ref = _LPIPS(pretrained=True, net="alex", pnet_rand=True)  # random backbone (no download) + shipped alex.pth
    with torch.no_grad():
        for name, p in ref.net.named_parameters():  # slice{k}.{index in alexnet.features}.{weight|bias}
            _, index, kind = name.split(".")
            p.copy_(state[f"features.{index}.{kind}"])
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    with torch.no_grad():
        expected = ref(a, b, normalize=True).flatten()
        got = alexnet_lpips(weights)(a, b)  # None: torchmetrics' shipped lpips v0.1 linear layers
    assert float(expected.min()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="alexnet_weights"):
        alexnet_lpips(tmp_path / "none.pth")
