"""Sampling (DESIGN.md §3 layer 5): the denoising loop (``loop``) and the one text-to-image entry point (``pipeline``).

Images cross API boundaries as float32 tensors ``(B, 3, H, W)`` in [0, 1] on the CPU (see
``ctrlgen.sampling.pipeline``); latents stay latents (``(B, C, h, w)``, scaled, on the model's device).
"""
from ctrlgen.sampling.loop import Refiner, SampleOutput, initial_latents, predict_model_output, predict_noise, sample
from ctrlgen.sampling.pipeline import PipelineOutput, decode_images, text_to_image

__all__ = ["Refiner", "SampleOutput", "sample", "predict_model_output", "predict_noise", "initial_latents",
           "text_to_image", "PipelineOutput", "decode_images"]
