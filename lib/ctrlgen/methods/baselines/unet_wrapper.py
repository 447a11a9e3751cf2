"""A module that looks like a U-Net to the book's one sampler (``ctrlgen.sampling.text_to_image``) and one trainer
(``ctrlgen.training.train_diffusion``) while conditioning every call on inputs set for the batch beforehand.

ControlNet's ``ControlledUNet`` (conditioning images → residuals added to the skip connections, Eq. 2.33) and
IP-Adapter's ``ImagePromptedUNet`` (image prompts → tokens of the decoupled cross-attention) are both this facade:
the wrapped U-Net's ``config``, ``dtype`` and ``device`` (what the sampler and trainer read), a setter for the
batch's inputs, and ``forward(sample, t, encoder_hidden_states)`` that conditions and then calls the wrapped U-Net.
Each subclass supplies only its conditioning (``unet_kwargs``). What the U-Net predicts (ε or v) is the wrapped
model's business: the sampler steps and the trainer builds its target through the diffusers scheduler.
"""
from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn


class ConditionedUNet(nn.Module, abc.ABC):
    """``unet`` (a diffusers U-Net or another ``ConditionedUNet``) whose calls are conditioned on ``inputs``.

    ``set_inputs(x)`` sets the inputs of the next calls (subclasses name it for their inputs); ``forward`` raises
    RuntimeError while none are set, else calls ``unet`` with the extra keyword arguments ``unet_kwargs`` returns.
    ``setter`` is how the error message tells the caller to set them."""

    setter = "set_inputs(inputs)"

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.inputs: torch.Tensor | None = None

    @property
    def config(self):
        """The wrapped U-Net's config (``in_channels``, ``sample_size``: what the sampler reads)."""
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def set_inputs(self, inputs: torch.Tensor) -> "ConditionedUNet":
        """The inputs of the next calls (one per sample of the batch); returns ``self`` for chaining."""
        self.inputs = inputs
        return self

    @abc.abstractmethod
    def unet_kwargs(self, inputs: torch.Tensor, sample: torch.Tensor, timestep,
                    encoder_hidden_states: torch.Tensor) -> dict[str, Any]:
        """The conditioning of one call: extra keyword arguments for the wrapped U-Net (subclasses)."""

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs: Any):
        if self.inputs is None:
            raise RuntimeError(f"{type(self).__name__}: call {self.setter} before the U-Net")
        extra = self.unet_kwargs(self.inputs, sample, timestep, encoder_hidden_states)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **extra, **kwargs)


def shuffled_batches(n: int, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless index batches over ``n`` samples: a permutation per epoch from one generator seeded ``seed``, only
    full batches (one short batch when ``n < batch_size``). A training loader sets each batch's inputs on its
    ``ConditionedUNet`` as it yields the batch: ``train_diffusion`` calls the U-Net on the batch it drew last."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, max(1, n - batch_size + 1), batch_size):
            yield torch.as_tensor(order[start:start + batch_size])


__all__ = ["ConditionedUNet", "shuffled_batches"]
