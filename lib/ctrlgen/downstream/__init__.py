"""The downstream evaluation harness (thesis §4.4.3–4.4.4, §4.5, §4.7.2, §5.4): segmentation and classification
zoos, their trainers with early stopping, and the scores and tests that read them.

Layer 7 (beside ``metrics`` and ``analysis``): chapter 4 part II (augmentation with synthetic data) and chapter 5
(bias identification and mitigation, skin-tone annotation) use this one harness.

* :mod:`.classifiers` — ``build_classifier``: torchvision VGG16, ResNet18, DenseNet121, ViT-B/16,
  EfficientNet-V2-S, MobileNet-V2; ImageNet weights from a local file.
* :mod:`.segmenters` — ``build_segmenter``: U-Net and Attention U-Net (MONAI), DCSAU-Net, XBound-Former, FAT-Net.
* :mod:`.train` — ``settings`` (a chapter's overrides merged over the ``downstream`` profile section),
  ``FitSettings``, ``EarlyStopping``, ``train_segmenter``, ``train_classifier``, ``predict``.
* :mod:`.scores` — per-image Dice/IoU, micro P/R/F1 and class-wise F1, paired t-tests, the Fig. 4.11 gain table.

Models take images as float ``(B, 3, H, W)`` in [0, 1] (CONVENTIONS.md); the ImageNet normalisation and, for
classifiers, the resize to the classifier's input size happen inside the returned module (:class:`ImageInput`).
"""
from ctrlgen.downstream.classifiers import CLASSIFIERS, build_classifier, classifier_weights
from ctrlgen.downstream.inputs import ImageInput, resize_images, resize_masks
from ctrlgen.downstream.scores import (ClassificationScores, PairedTest, classification_scores, gain_analysis,
                                       paired_test, segmentation_scores, segmentation_summary)
from ctrlgen.downstream.segmenters import SEGMENTERS, build_segmenter
from ctrlgen.downstream.train import (EarlyStopping, FitResult, FitSettings, TaskSettings, predict, predict_labels,
                                      predict_masks, predict_proba, settings, stopping_epoch, train_classifier,
                                      train_segmenter)

__all__ = ["CLASSIFIERS", "SEGMENTERS", "ImageInput", "resize_images", "resize_masks", "build_classifier",
           "classifier_weights", "build_segmenter", "settings", "FitSettings", "TaskSettings", "FitResult", "EarlyStopping",
           "stopping_epoch", "train_segmenter", "train_classifier", "predict", "predict_masks", "predict_labels",
           "predict_proba", "segmentation_scores", "segmentation_summary",
           "classification_scores", "ClassificationScores", "paired_test", "PairedTest", "gain_analysis"]
