"""Training the downstream models with early stopping on a validation split (thesis §4.7.2, §5.4.1, §5.4.2).

§4.7.2: segmenters with Adam, lr 1e-3, batch 16, early stopping with patience 20 "concerning the accuracy on the
validation set"; classifiers with SGD (momentum 0.9), lr 1e-3, batch 128, patience 10 on validation accuracy.
Each setting has one home (:func:`settings`): the harness defaults are the profile's ``downstream.<task>`` sections
(the §4.7.2 values in the full profile: chapter 4 trains with them as they are), and a chapter section holds only
the keys that chapter sets differently, e.g. ``ch05.segmentation.batch_size`` (§5.4.2: 24) or ``ch05.skin_tone``
(§5.4.1: batch 64). :meth:`FitSettings.from_profile` and :meth:`TaskSettings.from_profile` take those sections.

The validation score is mean per-image IoU for segmenters (the thesis's "accuracy" of a mask) and accuracy for
classifiers; the weights of the best validation epoch are restored at the end. Reproducibility: build the model
with :func:`seeded_model` (``seeded_model(build_segmenter, settings.seed, "unet")``), whose initialisation draws from
torch's RNG seeded with ``settings.seed``; the fit's own random draws (shuffling, flips, dropout) come from
``settings.seed`` too, in a fork of torch's global RNG, so the same settings give the same model and predictions on
CPU whatever ran before in the process (and the caller's random stream is left as it was).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from sklearn.metrics import f1_score
from sklearn.utils.class_weight import compute_sample_weight
from torch import nn
from torch.utils.data import WeightedRandomSampler

from ctrlgen.data.tensors import image_tensor
from ctrlgen.downstream.classifiers import CLASSIFIERS
from ctrlgen.downstream.segmenters import SEGMENTERS
from ctrlgen.metrics.overlap import iou
from ctrlgen.progress import tqdm
from ctrlgen.runtime import resolve_device

TASKS = ("segmentation", "classification")
# validation scores a classifier's early stopping can watch: (true, predicted) -> score, higher is better
VAL_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda y, p: float((y == p).mean()),
    "macro_f1": lambda y, p: float(f1_score(y, p, average="macro", zero_division=0)),
}
OPTIMIZERS = ("adam", "sgd")
# how a classifier's epoch draws its training images: "shuffle" (each image once, the thesis's plain training) or
# "balanced" (as many draws as images, with replacement, each class equally likely: torch's WeightedRandomSampler
# with scikit-learn's "balanced" sample weights) — a stated stand-in where a from-scratch classifier on a few hundred
# HAM10000 images otherwise learns to answer the majority class (chapter 4 part II, chapter 5 on mini)
SAMPLINGS = ("shuffle", "balanced")


@dataclass(frozen=True)
class FitSettings:
    """How one downstream model is trained (one ``downstream.<task>`` profile section)."""

    max_epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"       # "adam" | "sgd"
    momentum: float = 0.0         # SGD only
    patience: int = 10            # epochs without a better validation score before stopping
    seed: int = 0
    augment: bool = True          # random horizontal and vertical flips (image and mask together)
    sampling: str = "shuffle"     # classifiers: "shuffle" | "balanced" (SAMPLINGS); segmenters always shuffle
    device: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        for name in ("max_epochs", "batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], task: str, *overrides: str, progress: bool = False) -> "FitSettings":
        """Settings of the profile's ``downstream.<task>`` section ("segmentation" or "classification") with the
        chapter sections ``overrides`` merged over it (:func:`settings`), the profile's ``seed`` and ``device``."""
        s = settings(cfg, task, *overrides)
        return cls(max_epochs=int(s["max_epochs"]), batch_size=int(s["batch_size"]), lr=float(s["lr"]),
                   optimizer=str(s["optimizer"]), momentum=float(s["momentum"]), patience=int(s["patience"]),
                   seed=int(cfg["seed"]), augment=bool(s["augment"]), sampling=str(s.get("sampling", cls.sampling)),
                   device=resolve_device(cfg), progress=progress)


@dataclass(frozen=True)
class TaskSettings:
    """One ``downstream.<task>`` profile section: which models of the zoo, at what input side, and how to fit them.

    ``size``: the segmenters' size ("mini" or "full", :func:`build_segmenter`); "" for classification.
    """

    task: str
    models: tuple[str, ...]
    image_size: int
    size: str
    fit: FitSettings

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], task: str, *overrides: str,
                     progress: bool = False) -> "TaskSettings":
        """``downstream.<task>`` with the chapter sections ``overrides`` merged over it (:func:`settings`)."""
        s = settings(cfg, task, *overrides)
        known = SEGMENTERS if task == "segmentation" else CLASSIFIERS
        models = tuple(str(m) for m in s["models"])
        unknown = [m for m in models if m not in known]
        if unknown or not models:
            where = next((o for o in reversed(overrides) if "models" in _lookup(cfg, o)), f"downstream.{task}")
            raise ValueError(f"{where}.models = {list(models)}: expected a non-empty list of {', '.join(known)}")
        return cls(task, models, int(s["image_size"]), str(s["size"]) if task == "segmentation" else "",
                   FitSettings.from_profile(cfg, task, *overrides, progress=progress))


def settings(cfg: Mapping[str, Any], task: str, *overrides: str) -> dict[str, Any]:
    """One chapter's view of the harness settings of ``task``: the profile's ``downstream.<task>`` section with, for
    each dotted section path in ``overrides`` (e.g. ``"ch05.segmentation"``, then ``"ch05.mitigation"``), its keys
    that ``downstream.<task>`` also defines replacing the values, later sections winning.

    The chapter sections' other keys (``n_train_images``...) are the chapter's own and are not merged. So
    ``downstream.<task>.<key>`` reaches every chapter whose sections do not define ``<key>``, and a chapter's value
    is always in that chapter's section: no setting is read from two places.
    """
    if task not in TASKS:
        raise ValueError(f"unknown downstream task {task!r}; expected one of {', '.join(TASKS)}")
    merged = dict(cfg["downstream"][task])
    for path in overrides:
        section = _lookup(cfg, path)
        merged.update({k: section[k] for k in section if k in merged})
    return merged


def _lookup(cfg: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """The profile section at the dotted ``path``; a clear error when there is none."""
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"no profile section {path!r} (at {part!r}) to override downstream settings with")
        node = node[part]
    if not isinstance(node, Mapping):
        raise ValueError(f"profile key {path!r} is a value, not a section of downstream overrides")
    return node


# ================================================================================================ early stopping
class EarlyStopping:
    """Stop after ``patience`` consecutive epochs whose validation score does not beat the best so far.

    ``mode="max"`` (accuracy, IoU) or ``"min"`` (a loss). A NaN score never counts as an improvement.
    """

    def __init__(self, patience: int, mode: str = "max"):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.patience, self.mode = patience, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = -1
        self.epoch = -1
        self.bad_epochs = 0

    def step(self, score: float) -> bool:
        """Record one epoch's score; True when it is the new best (save the weights then)."""
        self.epoch += 1
        better = score > self.best if self.mode == "max" else score < self.best
        if better:  # NaN compares False: never better
            self.best, self.best_epoch, self.bad_epochs = float(score), self.epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def stopping_epoch(curve: Sequence[float], patience: int, mode: str = "max") -> tuple[int, int]:
    """``(best epoch, last epoch run)`` (0-based) when early stopping watches the validation ``curve``."""
    stopper = EarlyStopping(patience, mode)
    for score in curve:
        stopper.step(score)
        if stopper.should_stop:
            break
    return stopper.best_epoch, stopper.epoch


# ================================================================================================ training
@dataclass
class FitResult:
    """A trained model (best-validation weights restored, in eval mode) and its per-epoch history."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)  # epoch, train loss, validation score
    best_epoch: int = -1
    best_score: float = float("nan")
    epochs_run: int = 0
    stopped_early: bool = False


def _optimizer(model: nn.Module, s: FitSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum)
    # fused: one kernel over all parameters; on a CPU a VGG-16 step drops from ~3 s to ~0.2 s (chapter 5's measurement)
    return torch.optim.Adam(params, lr=s.lr, fused=True)


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 images (N, H, W, 3), got {arr.dtype} {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{name} is empty: nothing to train or validate on")
    return arr


def _batches(n: int, batch_size: int, generator: torch.Generator, weights: np.ndarray | None = None
             ) -> list[torch.Tensor]:
    """Shuffled index batches; a last batch of one sample is dropped (BatchNorm cannot train on it). With per-sample
    ``weights`` (:func:`balanced_weights`): ``n`` draws with replacement in proportion to them
    (``sampling="balanced"``, see ``SAMPLINGS``)."""
    if weights is None:
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.as_tensor(list(WeightedRandomSampler(weights, n, replacement=True, generator=generator)))
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return out[:-1] if len(out) > 1 and len(out[-1]) == 1 else out


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights that make every class equally likely to be drawn: scikit-learn's "balanced" weights,
    ``n / (n_classes * count(label))``."""
    return compute_sample_weight("balanced", labels)


def _flip(x: torch.Tensor, y: torch.Tensor | None, rng: np.random.Generator):
    for dim in (-1, -2):
        if rng.uniform() < 0.5:
            x = x.flip(dim)
            y = y.flip(dim) if y is not None else None
    return x, y


@contextmanager
def seeded_torch_rng(seed: int, device: str = "cpu") -> Iterator[None]:
    """Torch's global RNG (CPU, and ``device`` if it is a GPU) seeded with ``seed`` inside the block and restored after
    it: the draws inside depend on ``seed`` only, the caller's stream is not consumed."""
    dev = torch.device(device)
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def seeded_model(build: Callable[..., nn.Module], seed: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``build(*args, **kwargs)`` (``build_classifier``, ``build_segmenter``) with its random initialisation drawn
    from ``seed`` (``FitSettings.seed``): the same seed builds the same weights, whatever ran before."""
    with seeded_torch_rng(seed):
        return build(*args, **kwargs)


def _fit(model: nn.Module, images: np.ndarray, targets: torch.Tensor, val_score: Callable[[nn.Module], float],
         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], s: FitSettings, dense: bool,
         desc: str) -> FitResult:
    """The loop both trainers share (dropout and other in-model draws seeded from ``s.seed``, see module doc)."""
    with seeded_torch_rng(s.seed, s.device):
        return _fit_loop(model, images, targets, val_score, loss_fn, s, dense, desc)


def _fit_loop(model: nn.Module, images: np.ndarray, targets: torch.Tensor, val_score: Callable[[nn.Module], float],
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], s: FitSettings, dense: bool,
              desc: str) -> FitResult:
    """Epochs of shuffled mini-batches, validation, early stopping, best weights."""
    model.to(s.device)
    opt = _optimizer(model, s)
    generator = torch.Generator().manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    stopper = EarlyStopping(s.patience, "max")
    best_state = copy.deepcopy(model.state_dict())
    result = FitResult(model)
    weights = balanced_weights(targets.numpy()) if s.sampling == "balanced" and not dense else None
    bar = tqdm(range(s.max_epochs), desc=desc, disable=not s.progress, leave=False)
    for epoch in bar:
        model.train()
        losses = []
        for idx in _batches(len(images), s.batch_size, generator, weights):
            x = image_tensor(images[idx.numpy()], signed=False)
            y = targets[idx]
            if s.augment:
                x, flipped = _flip(x, y if dense else None, rng)
                y = flipped if dense else y
            x, y = x.to(s.device), y.to(s.device)
            loss = loss_fn(model(x), y)
            aux = model.auxiliary_loss(y) if dense and hasattr(model, "auxiliary_loss") else None
            loss = loss + aux if aux is not None else loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        score = val_score(model)
        result.history.append({"epoch": epoch, "train loss": float(np.mean(losses)), "validation": score})
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val=f"{score:.3f}")
        if stopper.step(score):
            best_state = copy.deepcopy(model.state_dict())
        if stopper.should_stop:
            result.stopped_early = True
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    result.best_epoch, result.best_score, result.epochs_run = stopper.best_epoch, stopper.best, stopper.epoch + 1
    return result


def train_segmenter(model: nn.Module, train_images: np.ndarray, train_masks: np.ndarray, val_images: np.ndarray,
                    val_masks: np.ndarray, settings: FitSettings) -> FitResult:
    """Train a one-channel segmenter on lesion masks with BCE + soft Dice (MONAI ``DiceCELoss``), early stopping on
    the validation mean IoU (Eq. (4.22), prediction = logit > 0), plus the model's auxiliary loss if it has one
    (XBound-Former's boundary supervision). Images uint8 ``(N, H, W, 3)``, masks bool ``(N, H, W)``."""
    train_images, val_images = _check_images(train_images, "train_images"), _check_images(val_images, "val_images")
    masks = _check_masks(train_masks, train_images, "train_masks")
    val_masks = _check_masks(val_masks, val_images, "val_masks")
    loss = DiceCELoss(sigmoid=True)
    return _fit(model, train_images, torch.from_numpy(masks.astype(np.float32))[:, None],
                lambda m: float(iou(predict_masks(m, val_images, settings.batch_size), val_masks).mean()),
                loss, settings, dense=True, desc="segmenter")


def train_classifier(model: nn.Module, train_images: np.ndarray, train_labels: Sequence[int], val_images: np.ndarray,
                     val_labels: Sequence[int], settings: FitSettings, val_metric: str = "accuracy") -> FitResult:
    """Train a classifier with cross-entropy, early stopping on validation accuracy (§4.7.2) or, with
    ``val_metric="macro_f1"``, on the validation macro-F1 (Table 5.1's metric, for the skin-tone base models).
    Labels are class indices ``0 .. num_classes - 1`` (the model's output width)."""
    if val_metric not in VAL_METRICS:
        raise ValueError(f"val_metric {val_metric!r} is not one of {', '.join(VAL_METRICS)}")
    train_images, val_images = _check_images(train_images, "train_images"), _check_images(val_images, "val_images")
    labels = _check_labels(train_labels, train_images, "train_labels")
    val = _check_labels(val_labels, val_images, "val_labels")
    return _fit(model, train_images, torch.from_numpy(labels),
                lambda m: VAL_METRICS[val_metric](val, predict_labels(m, val_images, settings.batch_size)),
                nn.CrossEntropyLoss(), settings, dense=False, desc="classifier")


def _check_masks(masks: np.ndarray, images: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(masks)
    if arr.shape != images.shape[:3]:
        raise ValueError(f"{name} must be (N, H, W) = {images.shape[:3]} like its images, got {arr.shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be boolean (or 0/1) masks, got {arr.dtype} with other values")
    return arr.astype(bool)


def _check_labels(labels: Sequence[int], images: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (len(images),) or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise ValueError(f"{name} must be {len(images)} non-negative integer class indices, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


# ================================================================================================ prediction
@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The model's outputs (logits) for uint8 images ``(N, H, W, 3)``, in eval mode, batched, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(image_tensor(images[i:i + batch_size], signed=False).to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def predict_masks(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Boolean masks ``(N, H, W)``: a segmenter's first output channel with logit > 0 (probability > 0.5)."""
    return predict(model, images, batch_size)[:, 0] > 0


def predict_labels(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class indices ``(N,)``: the arg-max of a classifier's logits."""
    return predict(model, images, batch_size).argmax(axis=1)


def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities ``(N, C)``: the softmax of a classifier's logits (inputs of an ensemble, §5.4.1)."""
    return torch.from_numpy(predict(model, images, batch_size)).softmax(dim=1).numpy()


__all__ = ["FitSettings", "TaskSettings", "settings", "FitResult", "EarlyStopping", "stopping_epoch", "train_segmenter",
           "train_classifier", "predict", "predict_masks", "predict_labels", "predict_proba", "VAL_METRICS",
           "seeded_model", "seeded_torch_rng", "SAMPLINGS", "balanced_weights"]
