"""Skin-tone annotation of dermoscopic images (thesis §5.3.2, §5.4.1, Table 5.1).

* ``ita``: the two ITA baselines (ITA over YCbCr skin pixels; 8-patch ITA) with the thesis's ITA → Fitzpatrick
  thresholds, as three-group annotators;
* ``base``: the six torchvision base models finetuned to the groups FST I-II / III-IV / V-VI;
* ``ensemble``: the seven scikit-learn ensembles over MobileNet-V2, ViT-B-16 and VGG-16, and the final
  annotator (logistic regression).
"""
from ctrlgen.methods.skin_tone.base import (
    BASE_MODELS,
    DISPLAY_NAMES,
    ENSEMBLE_BASES,
    BaseFitConfig,
    BaseFitResult,
    build_base_model,
    finetune_base,
    predict_proba,
)
from ctrlgen.methods.skin_tone.ensemble import (
    ENSEMBLES,
    FINAL_ENSEMBLE,
    SkinToneAnnotator,
    classification_scores,
    fit_ensembles,
    score_table,
    stack_features,
)
from ctrlgen.methods.skin_tone.ita import ITA_METHODS, group_index, ita_annotate, ita_to_group, ita_to_type

__all__ = ["BASE_MODELS", "DISPLAY_NAMES", "ENSEMBLE_BASES", "BaseFitConfig", "BaseFitResult", "build_base_model",
           "finetune_base", "predict_proba", "ENSEMBLES", "FINAL_ENSEMBLE", "SkinToneAnnotator", "classification_scores",
           "fit_ensembles", "score_table", "stack_features", "ITA_METHODS", "group_index", "ita_annotate", "ita_to_group",
           "ita_to_type"]
