"""CXR-IRGen (thesis chapter 6): chest X-ray image–report pairs from labels.

* ``prompts`` — labels → "A chest X-Ray image with …, without …, and unclear about …", reference selection (§6.3.1);
* ``vision`` — text + reference image embedding (Eq. 6.1), finetuning and sampling through the book's one
  training loop and one text-to-image entry point;
* ``uvit`` — the U-ViT backbone (Bao et al. 2023) with the U-Net's call signature;
* ``language`` — stage-1 BART from one representative embedding (Eq. 6.2), the stage-2 prior (Eq. 6.3), reports.
"""
from ctrlgen.methods.cxr_irgen.language import (
    PriorViT, build_report_tokenizer, clean_report, decode_embeddings, encode_reports, join_findings_impression,
    prior_loss, reconstruction_loss, representative_embedding, small_bart, train_prior, train_stage1, usable_report,
    write_reports,
)
from ctrlgen.methods.cxr_irgen.prompts import (
    NO_REFERENCE, SAME_LABELS, SAME_POSITIVES, Reference, ReferencePool, branch_counts, check_label, label_prompt,
)
from ctrlgen.methods.cxr_irgen.uvit import UViT
from ctrlgen.methods.cxr_irgen.vision import (
    COMBINE_OF_BACKBONE, CLIPImageEmbedder, Conditions, LatentProjectionEmbedder, build_conditions, combine_embeddings,
    finetune_backbone, generate, reference_embeddings, text_token_norm,
)

__all__ = ["PriorViT", "build_report_tokenizer", "clean_report", "decode_embeddings", "encode_reports",
           "join_findings_impression", "prior_loss", "reconstruction_loss", "representative_embedding", "small_bart",
           "train_prior", "train_stage1", "usable_report", "write_reports", "NO_REFERENCE", "SAME_LABELS",
           "SAME_POSITIVES", "Reference", "ReferencePool", "branch_counts", "check_label", "label_prompt", "UViT",
           "COMBINE_OF_BACKBONE", "CLIPImageEmbedder", "Conditions", "LatentProjectionEmbedder", "build_conditions",
           "combine_embeddings", "finetune_backbone", "generate", "reference_embeddings", "text_token_norm"]
