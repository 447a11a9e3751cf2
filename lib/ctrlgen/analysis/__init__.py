"""Analysis (DESIGN.md §3 layer 7): diagnostics of the book's own models.

* ``quality`` — PSNR of a VAE round trip and a sample-vs-data distance on fixed, model-free features.
* ``self_attention`` — how much self-attention behaves like a same-region affinity (the affinity
  ratio of NOTES-mini-feasibility.md) per layer and head, and the diagonal mass.
* ``attention_views`` — cross- and self-attention maps of a model along a sampling trajectory and on
  real images, for the figures of chapter 2.
"""
from ctrlgen.analysis.quality import image_features, psnr, sample_distance
from ctrlgen.analysis.self_attention import affinity_table, head_self_attention, summarize_affinity

__all__ = ["psnr", "image_features", "sample_distance", "affinity_table", "head_self_attention", "summarize_affinity"]
