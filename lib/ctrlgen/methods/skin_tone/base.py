"""The six CNN base models of Table 5.1, finetuned to three Fitzpatrick groups (thesis §5.4.1).

The thesis finetunes torchvision's ImageNet models ResNet-18, VGG-16, DenseNet-121, EfficientNet-V2,
MobileNet-V2 and ViT-B-16 on Fitzpatrick17k (80/20 train/validation split, lr 1e-3, batch 64, early stopping
after 10 epochs without validation improvement) to the groups FST I-II, III-IV, V-VI. Here every model is
built with its torchvision constructor and its last layer replaced by a 3-way head; ImageNet weights load
from a local file (``weights``: a state-dict path; the full profile names them) and, without one, the model
starts from random initialisation (mini/smoke, which say so). Adam is the optimiser (the thesis names none). The stopping criterion is the validation macro-F1 (Table 5.1's
metric).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn
from torchvision import models as tvm

from ctrlgen.seeding import make_generator

BASE_MODELS = ("resnet18", "vgg16", "densenet121", "efficientnet_v2_s", "mobilenet_v2", "vit_b_16")
DISPLAY_NAMES = {"resnet18": "ResNet-18", "vgg16": "VGG-16", "densenet121": "DenseNet-121",
                 "efficientnet_v2_s": "EfficientNet-V2", "mobilenet_v2": "MobileNet-V2", "vit_b_16": "ViT-B-16"}
# §5.4.1: the three base models the ensemble is built on (the thesis's choice, not simply the top three by F1)
ENSEMBLE_BASES = ("mobilenet_v2", "vit_b_16", "vgg16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _replace_head(model: nn.Module, name: str, num_classes: int) -> nn.Module:
    """Swap the ImageNet classifier for a ``num_classes``-way linear layer (how torchvision models are finetuned)."""
    if name == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    elif name == "densenet121":
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    elif name == "vit_b_16":
        model.heads.head = nn.Linear(model.heads.head.in_features, num_classes)
    else:  # vgg16, efficientnet_v2_s, mobilenet_v2: the last layer of a Sequential classifier
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
    return model


def build_base_model(name: str, num_classes: int = 3, image_size: int = 224, weights: str | Path | None = None) -> nn.Module:
    """A torchvision base model with a ``num_classes`` head.

    ``weights``: a local ImageNet state-dict file for the torchvision architecture (its 1000-way head is
    replaced after loading). ViT-B-16 is built for ``image_size`` (a multiple of 16; a file's position
    embeddings must match it)."""
    if name not in BASE_MODELS:
        raise ValueError(f"unknown skin-tone base model {name!r}; choose one of {', '.join(BASE_MODELS)}")
    if name == "vit_b_16" and image_size % 16:
        raise ValueError(f"ViT-B-16 needs an image size divisible by 16 (its patch size), got {image_size}")
    model = tvm.vit_b_16(image_size=image_size) if name == "vit_b_16" else getattr(tvm, name)()
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"ImageNet weights for {name} not found at {path}: expected a torchvision state-dict file")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return _replace_head(model, name, num_classes)


@dataclass(frozen=True)
class BaseFitConfig:
    """Finetuning settings of §5.4.1 (profile ``ch05.skin_tone``): lr 1e-3, batch 64, patience 10 in the thesis."""

    lr: float = 1e-3
    batch_size: int = 64
    patience: int = 10
    max_epochs: int = 100
    image_size: int = 224
    seed: int = 0

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "BaseFitConfig":
        s = cfg["ch05"]["skin_tone"]
        return cls(lr=float(s["lr"]), batch_size=int(s["batch_size"]), patience=int(s["patience"]),
                   max_epochs=int(s["max_epochs"]), image_size=int(s["image_size"]), seed=int(cfg["seed"]))


def to_input(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> ImageNet-normalised float (N, 3, S, S), resized bilinearly to ``image_size``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, image_size: int, batch_size: int = 64) -> np.ndarray:
    """Softmax class probabilities (N, C) of a base model in eval mode."""
    model.eval()
    out = [F.softmax(model(to_input(images[i:i + batch_size], image_size)), dim=1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 3))


@dataclass
class BaseFitResult:
    """A finetuned base model (best validation epoch restored) and its per-epoch history."""

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int


def finetune_base(model: nn.Module, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                  fit: BaseFitConfig, progress: Callable[[int, dict], None] | None = None) -> BaseFitResult:
    """Finetune with cross-entropy, Adam(lr), shuffled mini-batches; stop after ``patience`` epochs without a
    better validation macro-F1 (§5.4.1) or at ``max_epochs``; restore the best epoch's weights."""
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ValueError(f"images and labels differ in length: train {len(train_x)} vs {len(train_y)}, val {len(val_x)} vs {len(val_y)}")
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError("skin-tone finetuning needs non-empty training and validation sets")
    gen = make_generator(fit.seed)
    # fused: one kernel over all parameters (VGG-16's 138 M: 0.2 s per CPU step instead of 3 s with the foreach loop)
    optimiser = torch.optim.Adam(model.parameters(), lr=fit.lr, fused=True)
    labels = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    best, best_epoch, best_state, history = -1.0, -1, None, []
    for epoch in range(fit.max_epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen).numpy()
        losses = []
        for i in range(0, len(order), fit.batch_size):
            idx = order[i:i + fit.batch_size]
            if len(idx) < 2 and len(order) > 1:  # a batch of one breaks BatchNorm in training mode
                continue
            loss = F.cross_entropy(model(to_input(train_x[idx], fit.image_size)), labels[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        pred = predict_proba(model, val_x, fit.image_size).argmax(1)
        val_f1 = float(f1_score(val_y, pred, average="macro", labels=[0, 1, 2], zero_division=0))
        history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "val_f1": val_f1})
        if progress is not None:
            progress(epoch, history[-1])
        if val_f1 > best:
            best, best_epoch, best_state = val_f1, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= fit.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return BaseFitResult(model, history, best_epoch)
