"""Ensembles over the base models' predictions and the final skin-tone annotator (thesis §5.3.2, §5.4.1, Table 5.1).

The thesis stacks the predictions of MobileNet-V2, ViT-B-16 and VGG-16 and tests seven scikit-learn
ensembles on them; logistic regression performs best and becomes the annotator: the three base models
predict, the logistic regression assigns the final group. The inputs here are the three models'
class-probability vectors side by side (9 features); the ensembles are fitted on predictions for images the
base models did not train on (their validation split), so that the stacker sees honest base predictions.
Hyperparameters are scikit-learn's defaults (the thesis states none), with a fixed random state.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.ensemble import AdaBoostClassifier, ExtraTreesClassifier, GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_fscore_support
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from ctrlgen.data.attributes import FST_GROUPS

# §5.4.1's six torchvision base models (trained by chapter 5's experiments with the downstream harness, layer 7:
# ``ctrlgen.downstream.classifiers.build_classifier`` / ``train.train_classifier``) and their Table 5.1 names
BASE_MODELS = ("resnet18", "vgg16", "densenet121", "efficientnet_v2_s", "mobilenet_v2", "vit_b_16")
DISPLAY_NAMES = {"resnet18": "ResNet-18", "vgg16": "VGG-16", "densenet121": "DenseNet-121",
                 "efficientnet_v2_s": "EfficientNet-V2", "mobilenet_v2": "MobileNet-V2", "vit_b_16": "ViT-B-16"}
# §5.4.1: the three base models the ensemble is built on (the thesis's choice, not simply the top three by F1)
ENSEMBLE_BASES = ("mobilenet_v2", "vit_b_16", "vgg16")

# Table 5.1's ensemble rows, in its order; each a factory taking the random state
ENSEMBLES: dict[str, Callable[[int], ClassifierMixin]] = {
    "Random Forest": lambda seed: RandomForestClassifier(random_state=seed),
    "Logistic Regression": lambda seed: LogisticRegression(max_iter=1000, random_state=seed),
    "SVM": lambda seed: SVC(random_state=seed),
    "Decision Tree": lambda seed: DecisionTreeClassifier(random_state=seed),
    "Extra Tree": lambda seed: ExtraTreesClassifier(random_state=seed),
    "AdaBoost": lambda seed: AdaBoostClassifier(random_state=seed),
    "Gradient Boosting": lambda seed: GradientBoostingClassifier(random_state=seed),
}
FINAL_ENSEMBLE = "Logistic Regression"


def stack_features(probabilities: Mapping[str, np.ndarray], bases: Sequence[str]) -> np.ndarray:
    """The ensembles' input: the named base models' (N, 3) probability arrays side by side -> (N, 3·len(bases))."""
    missing = [b for b in bases if b not in probabilities]
    if missing:
        raise ValueError(f"no predictions for base model(s) {missing}; have {sorted(probabilities)}")
    lengths = {b: len(probabilities[b]) for b in bases}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"base-model predictions differ in length: {lengths}")
    return np.concatenate([np.asarray(probabilities[b], dtype=float) for b in bases], axis=1)


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Macro precision, recall and F1 over the three groups (Table 5.1's columns; scikit-learn).

    Macro because of the thesis's own numbers: its precision differs from its recall in every row, which micro
    averaging cannot give (for single-label predictions micro P = R = accuracy); on a class-balanced test set like
    DDI, macro and support-weighted averages coincide."""
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(len(FST_GROUPS))), average="macro",
                                                 zero_division=0)
    return {"Precision ↑": float(p), "Recall ↑": float(r), "F1 Score ↑": float(f)}


def fit_ensembles(features: np.ndarray, labels: np.ndarray, seed: int = 0,
                  names: Sequence[str] = tuple(ENSEMBLES)) -> dict[str, ClassifierMixin]:
    """Fit each named ensemble on stacked base-model predictions."""
    if len(features) != len(labels) or len(features) == 0:
        raise ValueError(f"ensemble training needs matching, non-empty features and labels; got {len(features)} and {len(labels)}")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"ensemble training labels hold one class only ({np.unique(labels).tolist()}): nothing to separate")
    return {n: ENSEMBLES[n](seed).fit(features, labels) for n in names}


@dataclass
class SkinToneAnnotator:
    """The final annotator of §5.3.2: the three base models' probabilities -> logistic regression -> group."""

    bases: tuple[str, ...]
    stacker: ClassifierMixin

    def predict_index(self, probabilities: Mapping[str, np.ndarray]) -> np.ndarray:
        """Group index 0..2 for each image from the base models' probabilities."""
        return np.asarray(self.stacker.predict(stack_features(probabilities, self.bases)), dtype=int)

    def predict(self, probabilities: Mapping[str, np.ndarray]) -> np.ndarray:
        """Group names ("I-II", "III-IV", "V-VI")."""
        return np.asarray(FST_GROUPS, dtype=object)[self.predict_index(probabilities)]


def score_table(y_true: np.ndarray, predictions: Mapping[str, tuple[str, np.ndarray]]) -> pd.DataFrame:
    """Table 5.1 rows: ``predictions`` maps a row name to (section, predicted indices)."""
    rows = {(section, name): classification_scores(y_true, pred) for name, (section, pred) in predictions.items()}
    frame = pd.DataFrame(rows).T
    frame.index.names = ["Category", "Methods"]  # as thesis Table 5.1
    return frame
