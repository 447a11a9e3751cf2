"""Training (DESIGN.md §3 layer 5): losses, trainable-parameter selection, the Accelerate loop, checkpoints, VAE."""
from ctrlgen.training.augment import flip_where, mirror_sides, mirrored_ids, pick_where, random_flips
from ctrlgen.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from ctrlgen.training.loop import (
    AttentionAlignmentTerm,
    LossContext,
    LossTerm,
    SelfAttentionStructureTerm,
    TrainConfig,
    TrainResult,
    load_trainable,
    train_config_from,
    train_diffusion,
)
from ctrlgen.training.losses import (
    attention_alignment_loss,
    reconstruction_loss,
    self_attention_structure_loss,
    vae_loss,
)
from ctrlgen.training.params import TrainableParams, select_trainable
from ctrlgen.training.region_loss import RegionSelfAttentionTerm, region_self_attention_loss
from ctrlgen.training.vae import VAETrainConfig, VAETrainResult, latent_scaling_factor, train_vae

__all__ = [
    "TrainConfig", "TrainResult", "LossContext", "LossTerm", "AttentionAlignmentTerm", "SelfAttentionStructureTerm",
    "train_diffusion", "train_config_from", "load_trainable", "attention_alignment_loss", "reconstruction_loss",
    "self_attention_structure_loss", "vae_loss", "TrainableParams", "select_trainable", "VAETrainConfig",
    "VAETrainResult", "train_vae", "latent_scaling_factor", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "list_checkpoints", "mirror_sides", "mirrored_ids", "random_flips", "flip_where", "pick_where",
    "RegionSelfAttentionTerm", "region_self_attention_loss",
]
