"""The downstream harness (lib/ctrlgen/downstream): zoos, trainers, early stopping, scores — against hand cases and
scipy / scikit-learn / torchvision as references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torchvision import models as tvm

from ctrlgen.config import load_profile
from ctrlgen.downstream import (CLASSIFIERS, SEGMENTERS, EarlyStopping, FitSettings, TaskSettings, build_classifier,
                                build_segmenter, classification_scores, classifier_weights, gain_analysis,
                                paired_test, predict, predict_masks, predict_proba, resize_images, resize_masks,
                                segmentation_scores, segmentation_summary, stopping_epoch, train_classifier,
                                train_segmenter)
from ctrlgen.downstream import settings as downstream_settings
from ctrlgen.downstream.train import VAL_METRICS, _batches, _fit, balanced_weights


# ================================================================================================ zoos
@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmenters_return_logits_at_the_input_size(name):
    torch.manual_seed(0)
    net = build_segmenter(name, size="mini").eval()
    with torch.no_grad():
        for h, w in ((32, 32), (48, 40)):  # 48 x 40 is no multiple of the net's strides: padded and cropped back
            out = net(torch.rand(2, 3, h, w))
            assert out.shape == (2, 1, h, w) and torch.isfinite(out).all()
        assert build_segmenter(name, out_channels=2).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)


@pytest.mark.parametrize("name", ["dcsau_net", "xboundformer", "fat_net"])
def test_full_size_segmenters_build_wider_than_mini(name):
    mini, full = build_segmenter(name, size="mini"), build_segmenter(name, size="full").eval()
    assert sum(p.numel() for p in full.parameters()) > 5 * sum(p.numel() for p in mini.parameters())
    with torch.no_grad():
        assert full(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_segmenter_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown segmenter 'segformer'"):
        build_segmenter("segformer")
    with pytest.raises(ValueError, match="size 'tiny'"):
        build_segmenter("unet", size="tiny")
    with pytest.raises(ValueError, match="FAT-Net"):
        build_segmenter("unet", encoder_weights="x.pth")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_segmenter("unet")(torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifiers_give_one_logit_per_class_at_two_input_sizes(name):
    torch.manual_seed(0)
    for image_size in (32, 64):
        net = build_classifier(name, num_classes=3, image_size=image_size).eval()
        with torch.no_grad():
            assert net(torch.rand(2, 3, 40, 40)).shape == (2, 3)  # resized to image_size inside


def test_classifier_loads_a_local_imagenet_state_dict_and_replaces_only_the_head(tmp_path):
    torch.manual_seed(1)
    reference = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    net = build_classifier("resnet18", num_classes=7, weights=path, image_size=32)
    assert torch.equal(net.net.conv1.weight, reference.conv1.weight)
    assert torch.equal(net.net.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert net.net.fc.out_features == 7 and net.net.fc.in_features == reference.fc.in_features
    scratch = build_classifier("resnet18", num_classes=7, image_size=32)
    assert not torch.equal(scratch.net.conv1.weight, reference.conv1.weight)


def test_classifier_weight_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_classifier("resnet18", 3, weights=missing)
    wrong = tmp_path / "mobilenet.pth"
    torch.save(tvm.mobilenet_v2(weights=None).state_dict(), wrong)  # another architecture's weights
    with pytest.raises(ValueError, match=rf"{wrong}.*does not match.*resnet18.*missing keys"):
        build_classifier("resnet18", 3, weights=wrong)
    not_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_dict)
    with pytest.raises(ValueError, match=rf"{not_dict}: holds a list"):
        build_classifier("resnet18", 3, weights=not_dict)
    with pytest.raises(ValueError, match="unknown classifier 'alexnet'"):
        build_classifier("alexnet", 3)
    with pytest.raises(ValueError, match="divisible by its patch size 16"):
        build_classifier("vit_b_16", 3, image_size=40)


def test_classifier_weights_come_from_the_profile():
    assert classifier_weights(load_profile("smoke"), "resnet18") is None  # empty: from scratch
    cfg = load_profile("smoke", {"models.weights.imagenet.resnet18": "/weights/resnet18-f37072fd.pth"})
    assert str(classifier_weights(cfg, "resnet18")) == "/weights/resnet18-f37072fd.pth"


# ================================================================================================ early stopping
def test_early_stopping_on_hand_curves():
    # best 0.5 at epoch 1; epochs 2, 3, 4 do not beat it: patience 3 stops after epoch 4 (0.9 never seen)
    assert stopping_epoch([0.1, 0.5, 0.4, 0.5, 0.3, 0.9], patience=3) == (1, 4)
    assert stopping_epoch([0.1, 0.5, 0.4, 0.5, 0.3, 0.9], patience=4) == (5, 5)  # never stops: all epochs run
    assert stopping_epoch([0.3, float("nan"), 0.2], patience=2) == (0, 2)  # NaN is no improvement
    assert stopping_epoch([1.0, 0.5, 0.6, 0.7], patience=2, mode="min") == (1, 3)
    assert stopping_epoch([0.2, 0.2], patience=1) == (0, 1)  # equal is not better
    stopper = EarlyStopping(patience=2)
    assert stopper.step(0.4) and not stopper.step(0.3) and not stopper.should_stop
    assert not stopper.step(0.35) and stopper.should_stop and stopper.best == 0.4
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)


def test_fit_stops_on_the_validation_curve_and_restores_the_best_weights():
    """The loop with a scripted validation curve: it stops where ``stopping_epoch`` says and hands back the
    weights it had at the best epoch (snapshotted when each score was taken)."""
    curve = [0.2, 0.7, 0.5, 0.6, 0.1, 0.99]
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    seen: list[dict[str, torch.Tensor]] = []

    def score(m: nn.Module) -> float:
        seen.append({k: v.clone() for k, v in m.state_dict().items()})
        return curve[len(seen) - 1]

    images = np.random.default_rng(0).integers(0, 255, (8, 4, 4, 3), dtype=np.uint8)
    s = FitSettings(max_epochs=6, batch_size=4, lr=0.5, optimizer="sgd", patience=2, augment=False)
    result = _fit(model, images, torch.tensor([0, 1] * 4), score, nn.CrossEntropyLoss(), s, dense=False, desc="t")
    assert (result.best_epoch, result.epochs_run, result.stopped_early) == (1, 4, True)
    assert stopping_epoch(curve, 2) == (1, 3)
    assert result.best_score == 0.7 and [h["validation"] for h in result.history] == curve[:4]
    final = model.state_dict()
    assert all(torch.equal(final[k], seen[1][k]) for k in final)
    assert not torch.equal(final["0.weight"], seen[3]["0.weight"])  # training did move on after the best epoch


# ================================================================================================ training
def _squares(n: int, side: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright squares on a dark noisy background: a segmentation task a few epochs learn."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 70, (n, side, side, 3)).astype(np.uint8)
    masks = np.zeros((n, side, side), bool)
    for i in range(n):
        r, c = rng.integers(2, side - 12, 2)
        masks[i, r:r + 10, c:c + 10] = True
    images[masks] = 210
    return images, masks


def test_segmenter_learns_a_trivial_task_and_is_deterministic():
    images, masks = _squares(48)
    s = FitSettings(max_epochs=3, batch_size=8, lr=1e-2, patience=3, seed=3)
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        result = train_segmenter(build_segmenter("unet"), images[:40], masks[:40], images[40:], masks[40:], s)
        histories.append(result.history)
    assert histories[0] == histories[1]  # same seed, same run on CPU
    losses = [h["train loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0]
    chance = masks[40:].mean()  # IoU of predicting lesion everywhere
    ious = segmentation_scores(predict_masks(result.model, images[40:]), masks[40:])["IoU"]
    assert ious.mean() == pytest.approx(result.best_score) and result.best_score > max(0.5, 3 * chance)


def test_xboundformer_trains_with_its_boundary_loss():
    images, masks = _squares(12)
    torch.manual_seed(0)
    net = build_segmenter("xboundformer")
    net(torch.rand(2, 3, 32, 32))
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:20, 8:20] = 1
    aux = net.auxiliary_loss(target)
    aux.backward()
    assert torch.isfinite(aux) and net.net.boundary[0].edge.weight.grad.abs().sum() > 0
    net(torch.rand(1, 3, 40, 40))  # padded to 64 x 64 inside: the boundary target is padded alike
    assert net.net._edges[-1].shape[-2:] == (16, 16) and torch.isfinite(net.auxiliary_loss(target[:1, :, :40, :40]))
    result = train_segmenter(net, images[:8], masks[:8], images[8:], masks[8:],
                             FitSettings(max_epochs=1, batch_size=4, lr=1e-3))
    assert math.isfinite(result.history[0]["train loss"])


def test_classifier_trains_and_predictions_do_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 2
    images = np.where(labels[:, None, None, None] == 1, 200, 40).astype(np.uint8) + rng.integers(0, 30, (24, 32, 32, 3),
                                                                                                     dtype=np.uint8)
    torch.manual_seed(0)
    s = FitSettings(max_epochs=2, batch_size=8, lr=1e-2, optimizer="sgd", momentum=0.9, patience=2)
    result = train_classifier(build_classifier("mobilenet_v2", 2, image_size=32), images[:16], labels[:16],
                              images[16:], labels[16:], s)
    assert len(result.history) == 2 and 0 <= result.best_score <= 1
    np.testing.assert_allclose(predict(result.model, images, batch_size=5), predict(result.model, images, batch_size=24),
                               rtol=1e-4, atol=1e-5)
    proba = predict_proba(result.model, images)
    assert proba.shape == (24, 2) and np.allclose(proba.sum(1), 1)
    assert (proba.argmax(1) == predict(result.model, images).argmax(1)).all()
    with pytest.raises(ValueError, match="train_labels must be 16 non-negative integer"):
        train_classifier(result.model, images[:16], labels[:15], images[16:], labels[16:], s)
    with pytest.raises(ValueError, match="val_images must be uint8"):
        train_classifier(result.model, images[:16], labels[:16], images[16:].astype(float), labels[16:], s)


def test_fit_settings_from_the_profile_and_their_checks():
    cfg = load_profile("smoke", {"downstream.classification.batch_size": 7, "seed": 5})
    fit = FitSettings.from_profile(cfg, "classification")
    assert (fit.batch_size, fit.seed, fit.optimizer, fit.device) == (7, 5, cfg.downstream.classification.optimizer, "cpu")
    task = TaskSettings.from_profile(cfg, "segmentation")
    assert task.models == tuple(cfg.downstream.segmentation.models) and task.size == cfg.downstream.segmentation.size
    with pytest.raises(ValueError, match="unknown downstream task 'detection'"):
        FitSettings.from_profile(cfg, "detection")
    with pytest.raises(ValueError, match="downstream.segmentation.models"):
        TaskSettings.from_profile(load_profile("smoke", {"downstream.segmentation.models": ["unet", "vgg16"]}),
                                  "segmentation")
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        FitSettings(max_epochs=1, batch_size=1, lr=1e-3, optimizer="rmsprop")
    with pytest.raises(ValueError, match="patience must be >= 1"):
        FitSettings(max_epochs=1, batch_size=1, lr=1e-3, patience=0)
    with pytest.raises(ValueError, match="sampling 'oversample' is not one of shuffle, balanced"):
        FitSettings(max_epochs=1, batch_size=1, lr=1e-3, sampling="oversample")
    assert FitSettings.from_profile(load_profile("full"), "classification").sampling == "shuffle"  # §4.7.2: plain
    assert FitSettings.from_profile(load_profile("mini"), "segmentation").sampling == "shuffle"


def test_shuffled_batches_draw_each_index_once():
    batches = _batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    # a last batch of one sample is dropped (BatchNorm cannot train on it)
    assert sum(len(b) for b in _batches(9, 4, torch.Generator().manual_seed(0))) == 8


def test_balanced_batches_draw_every_class_equally_often():
    # 9 images of class 0, 1 of class 1: balanced weights n / (k n_c) = 10/18 and 10/2 (hand-computed), so each draw
    # is class 1 with probability 5 / (9 * 10/18 + 5) = 1/2; shuffling gives it 1/10
    labels = np.array([0] * 9 + [1])
    weights = balanced_weights(labels)
    np.testing.assert_allclose(weights, [10 / 18] * 9 + [5.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([torch.cat(_batches(10, 5, generator, weights)) for _ in range(400)]).numpy()
    assert len(draws) == 4000 and draws.max() == 9
    share = float((labels[draws] == 1).mean())
    assert stats.binomtest(int((labels[draws] == 1).sum()), len(draws), 0.5).pvalue > 1e-3, share
    assert abs(share - 0.5) < 0.05
    # within class 0 the nine images are drawn alike (each 1/18 of the draws)
    counts = np.bincount(draws, minlength=10)[:9]
    assert stats.chisquare(counts).pvalue > 1e-3
    # the same generator seed draws the same batches
    again = torch.cat(_batches(10, 5, torch.Generator().manual_seed(3), weights))
    assert torch.equal(again, torch.cat(_batches(10, 5, torch.Generator().manual_seed(3), weights)))


def test_settings_merge_a_chapters_overrides_over_the_harness_defaults():
    """Each key has one home: downstream.<task> unless the chapter's section defines it; later sections win; the
    chapter's own keys (n_train_images...) are not harness settings and stay out."""
    cfg = load_profile("smoke", {"downstream.segmentation.lr": 0.02, "downstream.segmentation.batch_size": 3,
                                 "ch05.segmentation.batch_size": 5, "ch05.mitigation.batch_size": 6})
    harness = downstream_settings(cfg, "segmentation")
    assert harness == dict(cfg.downstream.segmentation) and harness["batch_size"] == 3
    ch05 = downstream_settings(cfg, "segmentation", "ch05.segmentation")
    assert (ch05["batch_size"], ch05["lr"], ch05["models"]) == (5, 0.02, list(cfg.ch05.segmentation.models))
    finetune = downstream_settings(cfg, "segmentation", "ch05.segmentation", "ch05.mitigation")
    assert (finetune["batch_size"], finetune["lr"]) == (6, cfg.ch05.mitigation.lr)
    assert "low_contrast_threshold" not in finetune and set(finetune) == set(harness)
    tone = FitSettings.from_profile(cfg, "classification", "ch05.skin_tone")
    assert (tone.optimizer, tone.momentum, tone.lr) == ("adam", 0.0, cfg.ch05.skin_tone.lr)
    with pytest.raises(ValueError, match="no profile section 'ch05.nothing'"):
        downstream_settings(cfg, "segmentation", "ch05.nothing")
    # the error names the section the bad list came from (a plain mapping: the profile checks would refuse it first)
    plain = {"seed": 0, "device": "cpu", "downstream": {"segmentation": dict(cfg.downstream.segmentation)},
             "ch05": {"segmentation": {"models": ["unet", "vgg16"]}}}
    with pytest.raises(ValueError, match=r"ch05.segmentation.models = \['unet', 'vgg16'\]"):
        TaskSettings.from_profile(plain, "segmentation", "ch05.segmentation")


def test_resize_helpers_on_a_hand_case():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    assert resize_masks(masks, 2).tolist() == [[[True, False], [False, False]]]
    images = np.zeros((1, 4, 4, 3), np.uint8)
    images[0, :2, :2] = 200
    out = resize_images(images, 2)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 3) and out[0, 0, 0, 0] == 200 and out[0, 1, 1, 0] == 0


# ================================================================================================ scores
def test_segmentation_scores_in_every_branch():
    pred = np.zeros((4, 2, 2), bool)
    target = np.zeros((4, 2, 2), bool)
    # image 0: both empty -> 1, 1;  image 1: empty prediction of a lesion -> 0, 0
    target[1, 0, 0] = True
    pred[2, 1, 1] = True  # image 2: a lesion predicted where there is none -> 0, 0
    pred[3, 0, :] = True  # image 3: |P| = 3, |G| = 2, overlap 1 -> IoU 1/4, Dice 2/5
    pred[3, 1, 0] = True
    target[3, 0, 0] = target[3, 1, 1] = True
    scores = segmentation_scores(pred, target)
    np.testing.assert_allclose(scores["IoU"], [1, 0, 0, 0.25])
    np.testing.assert_allclose(scores["Dice"], [1, 0, 0, 0.4])
    summary = segmentation_summary(pred, target)
    assert summary["IoU"] == pytest.approx(1.25 / 4) and summary["Dice"] == pytest.approx(1.4 / 4)
    assert summary["thresholded Jaccard"] == pytest.approx(0.25)  # ISIC 2018: the 0.25 counts 0, the 1.0 stays


def test_classification_scores_against_a_hand_count():
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    s = classification_scores(y_true, y_pred)
    assert (s.precision, s.recall, s.f1) == pytest.approx((4 / 6, 4 / 6, 4 / 6))  # micro = accuracy here
    assert s.class_f1 == pytest.approx({0: 0.5, 1: 0.8, 2: 2 / 3})
    # micro over class 1 only: TP 2, FP 1, FN 0
    one = classification_scores(y_true, y_pred, labels=[1])
    assert (one.precision, one.recall, one.f1) == pytest.approx((2 / 3, 1.0, 0.8))
    # classes 1 and 2: TP 2 + 1, FP 1 + 0, FN 0 + 1
    assert classification_scores(y_true, y_pred, labels=[1, 2]).precision == pytest.approx(3 / 4)
    assert classification_scores(y_true, y_pred, labels=[0, 1, 2, 3]).class_f1[3] == 0.0  # absent class
    assert s.as_row()["F1 1"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="same length"):
        classification_scores([0, 1], [0])


def test_paired_test_against_scipy_and_a_hand_t():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 1.0, 1.0]
    # differences 1, 0, 2, 3: mean 1.5, sample sd sqrt(5/3), t = 1.5 / (sd / 2)
    t = 1.5 / (math.sqrt(5 / 3) / 2)
    result = paired_test(a, b)
    assert result.statistic == pytest.approx(t) and result.mean_difference == 1.5 and result.n == 4
    assert result.p == pytest.approx(2 * stats.t.sf(t, df=3))
    assert result.p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    flipped = paired_test(b, a)
    assert flipped.statistic == pytest.approx(-t) and flipped.mean_difference == -1.5 and flipped.p == result.p
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_test([1.0], [0.0])
    with pytest.raises(ValueError, match="same length"):
        paired_test([1.0, 2.0], [0.0])


def test_gain_analysis_bins_a_hand_case():
    base = [0.1, 0.15, 0.5, 1.0, 0.95]
    aug = [0.3, 0.1, 0.5, 1.0, 0.97]
    table = gain_analysis(base, aug, bins=[0.0, 0.2, 0.6, 1.0])
    assert table["count"].tolist() == [2, 1, 2]  # 1.0 falls in the closed last bin
    np.testing.assert_allclose(table["mean gain"], [0.075, 0.0, 0.01], atol=1e-12)
    np.testing.assert_allclose(table["share improved"], [0.5, 0.0, 0.5])
    assert table["bin"].tolist() == ["[0, 0.2)", "[0.2, 0.6)", "[0.6, 1]"]
    fine = gain_analysis(base, aug, bins=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert fine["count"].tolist() == [2, 0, 1, 0, 2] and math.isnan(fine["mean gain"][1])
    with pytest.raises(ValueError, match="outside the bins"):
        gain_analysis([1.2], [1.0], bins=[0.0, 1.0])
    with pytest.raises(ValueError, match="increasing"):
        gain_analysis(base, aug, bins=[0.0, 0.5, 0.5])


def test_classifier_early_stopping_can_watch_macro_f1():
    y, p = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
    assert VAL_METRICS["accuracy"](y, p) == 0.75
    assert VAL_METRICS["macro_f1"](y, p) == pytest.approx((6 / 7 + 0) / 2)  # class 0: P 3/4, R 1; class 1: 0
    images = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="val_metric 'auc'"):
        train_classifier(nn.Linear(1, 1), images, [0, 1, 0, 1], images, [0, 1, 0, 1],
                         FitSettings(max_epochs=1, batch_size=2, lr=1e-3), val_metric="auc")


def test_seeded_model_and_fit_give_the_same_predictions_whatever_ran_before():
    """Two identical runs (``seeded_model`` + ``train_classifier`` with the same ``FitSettings.seed``) after different
    uses of torch's global RNG give identical weights and predictions (MobileNet-V2 has dropout: the fit's own draws
    are seeded too); the caller's RNG stream is left as it was; another seed builds other weights."""
    from ctrlgen.downstream.train import seeded_model

    rng = np.random.default_rng(1)
    labels = np.arange(24) % 2
    images = np.where(labels[:, None, None, None] == 1, 200, 40).astype(np.uint8) + rng.integers(0, 30, (24, 32, 32, 3),
                                                                                                     dtype=np.uint8)
    s = FitSettings(max_epochs=2, batch_size=8, lr=1e-2, optimizer="sgd", momentum=0.9, patience=2, seed=5)
    runs = []
    for noise in (3, 11):
        torch.rand(noise)  # a different global RNG state before each run
        before = torch.get_rng_state()
        model = seeded_model(build_classifier, s.seed, "mobilenet_v2", 2, image_size=32)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        result = train_classifier(model, images[:16], labels[:16], images[16:], labels[16:], s)
        assert torch.equal(torch.get_rng_state(), before)  # neither the build nor the fit consumed the caller's stream
        runs.append((init, result.history, predict(result.model, images)))
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert runs[0][1] == runs[1][1]
    np.testing.assert_array_equal(runs[0][2], runs[1][2])
    other = seeded_model(build_classifier, s.seed + 1, "mobilenet_v2", 2, image_size=32).state_dict()
    assert not torch.equal(other["net.features.0.0.weight"], runs[0][0]["net.features.0.0.weight"])
