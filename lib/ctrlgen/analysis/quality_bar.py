"""The measurement side of the base models' quality bar (issue 12): does a mini base model draw what the
chapters study?

Four criteria, each a function of plain numbers that returns a small table (``pandas.DataFrame``) with
the measured ``value``, the ``threshold``, ``passed``, and a signed ``margin`` (in the value's units;
positive = passes by that much, negative = fails by that much), so a chapter can say *which criterion
fails and by how much*:

1. ``distance_criterion`` — samples' distance to held-out data at most halfway between the real-vs-real
   floor and the per-pixel-Gaussian ceiling (``gaussian_ceiling_images`` builds the ceiling set for any
   feature extractor, e.g. an FID-style distance).
2. ``prompt_fidelity_criterion`` — an attribute classifier trained on real images recognises the prompted
   attributes in samples: chance-corrected ratio of sample score to real held-out score ≥ 0.7.
3. ``vae_criterion`` — the same classifier (and a segmenter's IoU) on VAE round trips of held-out images
   keeps at least 95 % of its score on the originals; PSNR reported beside it.
4. ``affinity_criterion`` — self-attention's affinity ratio does not fall below a reference.

``info_rows`` adds measurements reported beside the criteria without a threshold (status "info"), e.g. how
well the scenes model's words localize in cross-attention (``analysis.cross_attention``).

The attribute classifier (``AttributeClassifier``, ``train_attribute_classifier``, ``score``) is a small
CNN with one head per attribute of ``ctrlgen.analysis.attribute_labels`` (softmax for a class attribute,
sigmoid for a multi-hot one). It is a measuring instrument for the book's own models, not a method of the
thesis, so no thesis equation applies; the AUROC it reports is the one chapter 6 uses for findings.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn

from ctrlgen.analysis.attribute_labels import CLASS, AttributeSchema
from ctrlgen.data.tensors import image_tensor
from ctrlgen.progress import tqdm
from ctrlgen.seeding import make_generator, numpy_rng

# Pass thresholds of issue 12 ("The bar").
DISTANCE_FRACTION = 0.5      # at most halfway from the floor to the ceiling
FIDELITY_THRESHOLD = 0.7     # at least 70 % of the real images' (chance-corrected) score
VAE_THRESHOLD = 0.95         # lose at most 5 %
MIN_CHANCE_GAP = 0.02        # a real score closer than this to chance makes a chance-corrected ratio undefined
COLUMNS = ["criterion", "quantity", "value", "threshold", "passed", "margin", "status"]


# ---------------------------------------------------------------------------------------------------------
# The attribute classifier
# ---------------------------------------------------------------------------------------------------------

def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """Conv–BN–ReLU blocks (the first at full resolution, the rest halving it), global average pooling,
    one linear head per attribute of ``schema`` (logits: ``(B, n_classes)`` or ``(B, n_labels)``)."""

    def __init__(self, schema: AttributeSchema, width: int = 32, depth: int = 4):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"AttributeClassifier needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        self.schema = schema
        chans = [width * min(2 ** i, 4) for i in range(depth)]
        blocks = [_block(3, chans[0], 1)] + [_block(a, b, 2) for a, b in zip(chans, chans[1:])]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({a.name: nn.Linear(chans[-1], len(a.values)) for a in schema.attributes})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: ``(B, 3, H, W)`` in [-1, 1] -> ``{attribute: logits}``."""
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}


def _check_labels(schema: AttributeSchema, labels: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    out = {}
    for a in schema.attributes:
        if a.name not in labels:
            raise ValueError(f"labels lack attribute {a.name!r} of the {schema.domain} schema; got {sorted(labels)}")
        y = np.asarray(labels[a.name])
        want = (n,) if a.kind == CLASS else (n, len(a.values))
        if y.shape != want:
            raise ValueError(f"labels[{a.name!r}] has shape {y.shape}; expected {want} for {n} images "
                             f"({a.kind}, {len(a.values)} values)")
        if a.kind == CLASS and (y.min() < 0 or y.max() >= len(a.values)):
            raise ValueError(f"labels[{a.name!r}] holds class indices outside 0..{len(a.values) - 1}")
        out[a.name] = y
    return out


def _loss(schema: AttributeSchema, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over attributes of cross-entropy (class) or binary cross-entropy (multi-hot)."""
    terms = [F.cross_entropy(logits[a.name], targets[a.name]) if a.kind == CLASS
             else F.binary_cross_entropy_with_logits(logits[a.name], targets[a.name])
             for a in schema.attributes]
    return torch.stack(terms).mean()


def train_attribute_classifier(images: np.ndarray, labels: Mapping[str, np.ndarray], schema: AttributeSchema,
                               steps: int = 1000, batch_size: int = 64, lr: float = 1e-3, width: int = 32,
                               depth: int = 4, flip: bool = True, seed: int = 0, device: str = "cpu",
                               progress: bool = False) -> AttributeClassifier:
    """Train an ``AttributeClassifier`` on real (or world) images and their caption labels with Adam.

    ``images``: ``(N, H, W, 3)`` uint8 (the data layer's convention); ``labels``: ``schema.encode(captions)``.
    Batches are drawn with replacement from a seeded generator and, with ``flip``, mirrored left–right at
    random (every attribute here — size, contrast, shapes, colours, count, findings — survives a mirror).
    Initialisation and batches come from ``seed`` only, so on CPU the same call gives the same weights.
    Returns the model in eval mode on the CPU.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
        raise ValueError(f"expected training images (N >= 2, H, W, 3), got shape {images.shape}")
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps must be >= 1 and batch_size >= 2 (batch norm), got {steps}, {batch_size}")
    y = _check_labels(schema, labels, len(images))
    with torch.random.fork_rng(devices=[]):  # the init is seeded without touching the caller's global RNG
        torch.manual_seed(seed)
        model = AttributeClassifier(schema, width, depth)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = make_generator(seed)
    for _ in tqdm(range(steps), desc=f"{schema.domain} attribute classifier", disable=not progress):
        idx = torch.randint(len(images), (batch_size,), generator=gen).numpy()
        x = image_tensor(images[idx])
        if flip:
            mirror = torch.rand(batch_size, generator=gen) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        targets = {a.name: torch.from_numpy(y[a.name][idx]).to(device) for a in schema.attributes}
        loss = _loss(schema, model(x.to(device)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.cpu().eval()


@torch.no_grad()
def predict(classifier: AttributeClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 256
            ) -> dict[str, np.ndarray]:
    """Class probabilities ``(N, n_classes)`` (softmax) or label probabilities ``(N, n_labels)`` (sigmoid).

    ``images``: ``(N, H, W, 3)`` uint8 from the data layer, or ``(N, 3, H, W)`` float in [0, 1] as
    ``sampling.text_to_image`` returns them.
    """
    classifier.eval()
    device = next(classifier.parameters()).device
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    chunks: dict[str, list[np.ndarray]] = {a.name: [] for a in classifier.schema.attributes}
    for i in range(0, len(arr), batch_size):
        logits = classifier(image_tensor(arr[i:i + batch_size]).to(device))
        for a in classifier.schema.attributes:
            p = logits[a.name].softmax(-1) if a.kind == CLASS else logits[a.name].sigmoid()
            chunks[a.name].append(p.cpu().numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


# ---------------------------------------------------------------------------------------------------------
# Scores and their chance levels
# ---------------------------------------------------------------------------------------------------------

def label_aurocs(y_true: np.ndarray, y_score: np.ndarray, min_count: int = 1) -> dict[int, float]:
    """AUROC (``sklearn.metrics.roc_auc_score``) of each label column with both classes present, each at
    least ``min_count`` times (a label with one positive among 100 images gives an AUROC that is mostly noise)."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if y_true.shape != y_score.shape or y_true.ndim != 2:
        raise ValueError(f"expected y_true and y_score of the same (N, K) shape, got {y_true.shape} and {y_score.shape}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    pos = y_true.sum(0)
    return {k: float(roc_auc_score(y_true[:, k], y_score[:, k])) for k in range(y_true.shape[1])
            if min_count <= pos[k] <= len(y_true) - min_count}


def macro_auroc(y_true: np.ndarray, y_score: np.ndarray, min_count: int = 1) -> float:
    """Unweighted mean AUROC over the labels with both classes present (``min_count`` times); NaN when none."""
    per = label_aurocs(y_true, y_score, min_count)
    return float(np.mean(list(per.values()))) if per else math.nan


def majority_rate(y: np.ndarray) -> float:
    """Share of the most frequent class: the best accuracy any constant prediction reaches on ``y``."""
    y = np.asarray(y)
    return float(np.bincount(y).max() / len(y)) if len(y) else math.nan


def _class_score(y: np.ndarray, pred: np.ndarray, metric: str) -> tuple[float, float, str]:
    """(score, chance, chance rule) of one class attribute."""
    if metric == "accuracy":
        return float((pred == y).mean()), majority_rate(y), "majority-class rate"
    present = len(np.unique(y))
    with warnings.catch_warnings():  # classes predicted but absent from y are expected on small sets
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred)), 1.0 / present, "1/k (k classes present)"


def score(classifier: AttributeClassifier, images: np.ndarray | torch.Tensor, labels: Mapping[str, np.ndarray],
          class_metric: str = "accuracy", min_count: int = 1) -> pd.DataFrame:
    """Per attribute: the classifier's score on ``images`` against ``labels`` and that score's chance level.

    Class attributes, ``class_metric="accuracy"``: accuracy, chance = the majority-class rate *of the
    scored labels* (not 1/k: it is the accuracy of the best constant guess, so a classifier that learned
    only the class prior scores at chance). ``"balanced accuracy"`` (``sklearn.metrics.balanced_accuracy_score``,
    the mean recall over the classes present): chance = 1/k exactly, for any constant guess; prefer it when
    one class dominates (e.g. derm contrast on ISIC, ~88 % dark), where accuracy's chance level is so close
    to the real score that a chance-corrected ratio is mostly noise. Multi-hot attributes: macro AUROC over
    the labels with both classes present at least ``min_count`` times each, chance = 0.5. Columns: ``attribute, metric, score, chance,
    chance_rule, n_images, n_labels`` (``n_labels``: classes, or the labels that entered the AUROC);
    indexed by attribute.
    """
    if class_metric not in ("accuracy", "balanced accuracy"):
        raise ValueError(f"class_metric must be 'accuracy' or 'balanced accuracy', got {class_metric!r}")
    schema = classifier.schema
    n = len(images)
    y = _check_labels(schema, labels, n)
    probs = predict(classifier, images)
    rows = []
    for a in schema.attributes:
        if a.kind == CLASS:
            value, chance, rule = _class_score(y[a.name], probs[a.name].argmax(-1), class_metric)
            rows.append(dict(attribute=a.name, metric=class_metric, score=value, chance=chance,
                             chance_rule=rule, n_images=n, n_labels=len(a.values)))
        else:
            per = label_aurocs(y[a.name], probs[a.name], min_count)
            rows.append(dict(attribute=a.name, metric="macro AUROC",
                             score=float(np.mean(list(per.values()))) if per else math.nan,
                             chance=0.5, chance_rule="0.5 (AUROC)", n_images=n, n_labels=len(per)))
    return pd.DataFrame(rows).set_index("attribute", drop=False)


# ---------------------------------------------------------------------------------------------------------
# The criteria
# ---------------------------------------------------------------------------------------------------------

def _row(criterion: str, quantity: str, value: float, threshold: float, higher_is_better: bool,
         undefined: str = "", **extra: Any) -> dict[str, Any]:
    """One table row; ``margin`` > 0 means the value is on the passing side of the threshold by that much."""
    if undefined or not (np.isfinite(value) and np.isfinite(threshold)):
        return dict(criterion=criterion, quantity=quantity, value=value, threshold=threshold, passed=False,
                    margin=math.nan, status="undefined", note=undefined or "value or threshold is not finite", **extra)
    margin = value - threshold if higher_is_better else threshold - value
    passed = bool(margin >= 0)
    return dict(criterion=criterion, quantity=quantity, value=float(value), threshold=float(threshold),
                passed=passed, margin=float(margin), status="pass" if passed else "fail",
                note=f"{'passes' if passed else 'fails'} by {abs(margin):.3g}", **extra)


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def _per_quantity(x: float | Mapping[str, float] | pd.Series, what: str) -> dict[str, float]:
    """A number -> ``{"all": x}``; a mapping or Series (e.g. ``score(...)["score"]``) -> a dict of floats."""
    if isinstance(x, (Mapping, pd.Series)):
        out = {str(k): float(v) for k, v in x.items()}
        if not out:
            raise ValueError(f"{what} is empty")
        return out
    if isinstance(x, (int, float, np.floating, np.integer)):
        return {"all": float(x)}
    raise ValueError(f"{what} must be a number or a mapping of numbers, got {type(x).__name__}")


def _matched(a: dict[str, float], b: dict[str, float], names: tuple[str, str]) -> None:
    """Every quantity of ``a`` has a value in ``b`` (a plain number in ``b`` applies to all)."""
    missing = sorted(set(a) - set(b))
    if missing and "all" not in b:
        raise ValueError(f"{names[1]} has no value for {missing} of {names[0]} (it names {sorted(b)})")


def _pick(values: dict[str, float], name: str) -> float:
    return values[name] if name in values else values["all"]


def gaussian_ceiling_images(images: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """Independent per-pixel Gaussians with the data's per-pixel (and per-channel) mean and std, clipped.

    The "ceiling" generator of the distance criterion: it knows each pixel's colour distribution and
    nothing about image structure. ``images``: ``(N, H, W, 3)`` uint8 (returned as uint8, rounded and
    clipped to 0..255) or float in [0, 1] (clipped to [0, 1]); std with ``ddof=0``. Feed the result to
    any feature extractor (``sample_distance``'s pooled colours, an FID-style network) as the ceiling set.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or len(arr) < 2:
        raise ValueError(f"expected at least two images (N, H, W, C), got shape {arr.shape}")
    n = len(arr) if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    x = arr.astype(np.float64)
    mu, sd = x.mean(0), x.std(0)
    draw = mu + sd * numpy_rng(seed).standard_normal((n, *mu.shape))
    if arr.dtype == np.uint8:
        return np.clip(np.rint(draw), 0, 255).astype(np.uint8)
    return np.clip(draw, 0.0, 1.0).astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64)


def _distance_triple(samples, floor, ceiling) -> tuple[float, float, float]:
    if isinstance(samples, Mapping):
        keys = {k.split()[0]: k for k in samples}  # sample_distance's keys: "samples", "floor (...)", "ceiling (...)"
        if not {"samples", "floor", "ceiling"} <= set(keys):
            raise ValueError(f"a distance dict needs 'samples', 'floor …' and 'ceiling …' keys "
                             f"(as sample_distance returns), got {sorted(samples)}")
        return float(samples[keys["samples"]]), float(samples[keys["floor"]]), float(samples[keys["ceiling"]])
    if isinstance(samples, Sequence) and not isinstance(samples, str):
        if len(samples) != 3:
            raise ValueError(f"a distance triple is (samples, floor, ceiling), got {samples!r}")
        return tuple(float(v) for v in samples)  # type: ignore[return-value]
    if floor is None or ceiling is None:
        raise ValueError("distance_criterion needs floor and ceiling with a single samples distance")
    return float(samples), float(floor), float(ceiling)


def distance_criterion(samples: float | Mapping[str, float] | Sequence[float], floor: float | None = None,
                       ceiling: float | None = None, metric: str = "SW1",
                       fraction: float = DISTANCE_FRACTION) -> pd.DataFrame:
    """Bar 1: samples' distance to held-out data ≤ floor + ``fraction`` · (ceiling − floor).

    ``samples`` is a number (with ``floor`` and ``ceiling``), the dict ``analysis.quality.sample_distance``
    returns, or a ``(samples, floor, ceiling)`` triple (e.g. FID of samples, of training images, and of
    ``gaussian_ceiling_images``, each against the held-out images). Extra column ``position`` =
    (samples − floor) / (ceiling − floor): 0 at the floor, 1 at the ceiling, pass at ≤ ``fraction``.
    """
    s, lo, hi = _distance_triple(samples, floor, ceiling)
    extra = dict(floor=lo, ceiling=hi, position=(s - lo) / (hi - lo) if hi > lo else math.nan)
    if not hi > lo:
        return _frame([_row("distance", metric, s, math.nan, False,
                            undefined=f"ceiling {hi:.4g} is not above floor {lo:.4g}: the distance cannot tell them apart",
                            **extra)])
    return _frame([_row("distance", metric, s, lo + fraction * (hi - lo), False, **extra)])


def chance_corrected_ratio(value: float, real: float, chance: float, min_gap: float = MIN_CHANCE_GAP) -> float:
    """(value − chance) / (real − chance); NaN (undefined) when ``real − chance < min_gap``."""
    gap = real - chance
    if not np.isfinite(gap) or gap < min_gap or not np.isfinite(value):
        return math.nan
    return (value - chance) / gap


def prompt_fidelity_criterion(sample_scores: float | Mapping[str, float] | pd.Series,
                              real_scores: float | Mapping[str, float] | pd.Series,
                              chance: float | Mapping[str, float] | pd.Series,
                              threshold: float = FIDELITY_THRESHOLD, min_gap: float = MIN_CHANCE_GAP) -> pd.DataFrame:
    """Bar 2: the classifier's score on samples generated from held-out captions vs on the real held-out
    images, per attribute; pass when the chance-corrected ratio (s − c) / (r − c) ≥ ``threshold``.

    Why chance-corrected: a raw ratio s / r of accuracies near chance passes a model that ignores the
    prompt — with two balanced classes and a classifier at 0.75 on real images, samples guessed at random
    score 0.5, a raw ratio of 0.67, while the chance-corrected ratio is 0. The raw ratio is reported too.
    A real score within ``min_gap`` of chance (the classifier did not learn the attribute) makes the
    ratio undefined, reported as such rather than divided by ~0. Inputs are numbers or mappings
    attribute → number (e.g. ``score(...)["score"]`` and the real table's ``["chance"]``).
    """
    s = _per_quantity(sample_scores, "sample_scores")
    r = _per_quantity(real_scores, "real_scores")
    c = _per_quantity(chance, "chance")
    _matched(s, r, ("sample_scores", "real_scores"))
    _matched(s, c, ("sample_scores", "chance"))
    rows = []
    for name, value in s.items():
        real, ch = _pick(r, name), _pick(c, name)
        ratio = chance_corrected_ratio(value, real, ch, min_gap)
        undefined = "" if np.isfinite(ratio) else (
            f"real score {real:.3g} is within {min_gap:g} of chance {ch:.3g}: the classifier did not learn "
            f"{name}" if np.isfinite(real - ch) else "a score is not finite")
        rows.append(_row("prompt fidelity", name, ratio, threshold, True, undefined=undefined,
                         sample_score=value, real_score=real, chance=ch,
                         raw_ratio=value / real if real else math.nan))
    return _frame(rows)


def vae_criterion(roundtrip_scores: float | Mapping[str, float] | pd.Series,
                  original_scores: float | Mapping[str, float] | pd.Series, psnr_db: float | None = None,
                  threshold: float = VAE_THRESHOLD, chance: float | Mapping[str, float] | pd.Series | None = None
                  ) -> pd.DataFrame:
    """Bar 3: scores on VAE round trips of held-out images keep ≥ ``threshold`` of the scores on the
    originals (ratio round trip / original; "lose at most 5 %").

    Quantities are the attribute classifier's scores and, if given, a segmenter's IoU (any mapping
    name → score). ``psnr_db`` (the round trip's mean PSNR) is reported beside every row. With ``chance``
    the chance-corrected ratio is added as a column (the stricter reading for AUROC, whose chance is 0.5);
    pass/fail uses the raw ratio as the bar states it.
    """
    t = _per_quantity(roundtrip_scores, "roundtrip_scores")
    o = _per_quantity(original_scores, "original_scores")
    _matched(t, o, ("roundtrip_scores", "original_scores"))
    c = _per_quantity(chance, "chance") if chance is not None else {}
    if c:
        _matched(t, c, ("roundtrip_scores", "chance"))
    rows = []
    for name, value in t.items():
        orig = _pick(o, name)
        extra = dict(roundtrip_score=value, original_score=orig, psnr_db=math.nan if psnr_db is None else float(psnr_db))
        if c:
            extra["chance_corrected_ratio"] = chance_corrected_ratio(value, orig, _pick(c, name))
        undefined = "" if orig > 0 else f"original score {orig:.3g} is not positive"
        rows.append(_row("VAE round trip", name, value / orig if orig > 0 else math.nan, threshold, True,
                         undefined=undefined, **extra))
    return _frame(rows)


def affinity_criterion(value: float, reference: float, tolerance: float = 0.0,
                       quantity: str = "affinity ratio") -> pd.DataFrame:
    """Bar 4: self-attention's affinity ratio (``analysis.self_attention``) of the default variant does not
    fall below ``reference`` (less ``tolerance``, e.g. a seed-to-seed spread)."""
    return _frame([_row("self-attention affinity", quantity, float(value), float(reference) - tolerance, True,
                        reference=float(reference))])


def info_rows(criterion: str, values: Mapping[str, float], note: str = "", **extra: Mapping[str, Any]) -> pd.DataFrame:
    """Informational rows beside the criteria: measured ``values`` (quantity -> number) with status "info",
    no threshold, no margin and ``passed`` empty (None): reported, never passed or failed (``failures``
    skips them). ``extra``: further columns, each a mapping quantity -> value."""
    if not values:
        raise ValueError(f"info_rows({criterion!r}) needs at least one value")
    return _frame([dict(criterion=criterion, quantity=str(q), value=float(v), threshold=math.nan, passed=None,
                        margin=math.nan, status="info", note=note, **{k: m.get(q) for k, m in extra.items()})
                   for q, v in values.items()])


def bar_table(*tables: pd.DataFrame) -> pd.DataFrame:
    """The criteria's tables in one (columns missing from a criterion are NaN)."""
    if not tables:
        raise ValueError("bar_table needs at least one criterion table")
    return pd.concat(tables, ignore_index=True)


def failures(table: pd.DataFrame) -> list[str]:
    """One line per criterion row that does not pass (fail or undefined; "info" rows are not criteria):
    which criterion fails, on what, and by how much."""
    out = []
    for _, r in table[table["status"].isin(["fail", "undefined"])].iterrows():
        how = r["note"] if r["status"] == "undefined" else (
            f"{r['value']:.3g} vs threshold {r['threshold']:.3g}, fails by {-r['margin']:.3g}")
        out.append(f"{r['criterion']} ({r['quantity']}): {how}")
    return out


__all__ = ["AttributeClassifier", "train_attribute_classifier", "predict", "score", "label_aurocs", "macro_auroc",
           "majority_rate", "gaussian_ceiling_images", "distance_criterion", "chance_corrected_ratio",
           "prompt_fidelity_criterion", "vae_criterion", "affinity_criterion", "info_rows", "bar_table", "failures",
           "DISTANCE_FRACTION", "FIDELITY_THRESHOLD", "VAE_THRESHOLD", "MIN_CHANCE_GAP"]
