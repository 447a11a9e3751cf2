"""The book's base models (chapter 2's pretraining; every chapter starts from them).

* ``keys`` — cache keys (profile values, data fingerprint, code version) and model folders;
* ``train`` — the VAE, then text encoder + U-Net of one domain, trained or loaded from the cache;
* ``measure`` — the quality and structure figures stored with each model
(the ``selfattn`` variant's auxiliary loss is ``ctrlgen.training.RegionSelfAttentionTerm``).

The domains' data and captions are ``ctrlgen.data.domains``.
"""
from ctrlgen.data.domains import DOMAINS, DomainData, cxr_caption, derm_captions
from ctrlgen.experiments.base_models.keys import (VARIANTS, available_variants, code_version, default_variant,
                                                  snapshot_steps, unet_key_parts, vae_dir, vae_key_parts, variant_dir, variant_steps)
from ctrlgen.experiments.base_models.measure import affinity_for, generate, heldout_noise_error, measure_model
from ctrlgen.experiments.base_models.train import (PretrainResult, ensure_vae, extra_vocabulary, load_domain_data,
                                                   load_snapshot, load_variant, pretrain_all, pretrain_domain, tokenizer_corpus)

__all__ = ["DOMAINS", "VARIANTS", "DomainData", "cxr_caption", "derm_captions", "available_variants", "code_version",
           "default_variant", "snapshot_steps", "unet_key_parts", "vae_dir", "vae_key_parts", "variant_dir", "variant_steps",
           "affinity_for", "generate", "heldout_noise_error",
           "measure_model", "PretrainResult", "ensure_vae", "extra_vocabulary", "load_domain_data", "load_variant", "load_snapshot",
           "pretrain_all", "pretrain_domain", "tokenizer_corpus"]
