"""Skin-tone annotation of dermoscopic images (thesis §5.3.2, §5.4.1, Table 5.1): the pure pieces.

* ``ita``: the two ITA baselines (ITA over YCbCr skin pixels; 8-patch ITA) with the thesis's ITA → Fitzpatrick
  thresholds, as three-group annotators;
* ``ensemble``: the names of the six torchvision base models and the three the ensemble stacks, the seven
  scikit-learn ensembles over MobileNet-V2, ViT-B-16 and VGG-16, and the final annotator (logistic regression).

The base models themselves are the downstream classifier zoo, finetuned by chapter 5's experiments module with the
downstream harness (``ctrlgen.downstream``, layer 7, which this layer may not import).
"""
from ctrlgen.methods.skin_tone.ensemble import (
    BASE_MODELS,
    DISPLAY_NAMES,
    ENSEMBLE_BASES,
    ENSEMBLES,
    FINAL_ENSEMBLE,
    SkinToneAnnotator,
    classification_scores,
    fit_ensembles,
    score_table,
    stack_features,
)
from ctrlgen.methods.skin_tone.ita import ITA_METHODS, group_index, ita_annotate, ita_to_group, ita_to_type

__all__ = ["BASE_MODELS", "DISPLAY_NAMES", "ENSEMBLE_BASES", "ENSEMBLES", "FINAL_ENSEMBLE", "SkinToneAnnotator",
           "classification_scores", "fit_ensembles", "score_table", "stack_features", "ITA_METHODS", "group_index",
           "ita_annotate", "ita_to_group", "ita_to_type"]
