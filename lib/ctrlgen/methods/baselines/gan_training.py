"""The training loop of the book's GAN baselines (Tables 4.1–4.4, §4.4.2–4.4.4; the thesis's §4.7.2 GAN training).

PGAN (``progressive_gan``), SL-StyleGAN as StyleGAN2 (``stylegan``) and Pix2PixHD (``pix2pixhd``) all train the
same way: seed torch and build the networks (plus an exponential-moving-average copy of the generator for the
unconditional ones), one AdamW per network, then per step one discriminator update followed by one generator
update, the EMA update, the loss record, and atomic checkpoints from which a rerun resumes. This module holds that
loop once (``setup_gan``, ``train_adversarial``, ``run_gan_training``); each GAN supplies only what its paper
defines, as two functions (``AdversarialLosses``):

* ``d_loss(step)``: draw the step's batch from ``GANSetup.rng`` and return the discriminator's loss and a context
  (the batch, fakes, discriminator outputs) that the generator's loss may reuse — PGAN's WGAN-GP with drift,
  StyleGAN2's non-saturating loss, Pix2PixHD's multi-scale LSGAN;
* ``g_loss(context)``: the generator's loss and what to log beside it (PGAN's level and fade-in α,
  Pix2PixHD's feature matching and VGG loss);

and, for lazy regularisation (StyleGAN2 §3.1 and Appendix B; stylegan2-ada-pytorch's ``training_loop.py``
phases Dmain/Dreg), a third: ``d_reg(context)``, a regulariser that is its own discriminator update after the main
one at every ``d_reg_interval``-th step (0-based steps 0, k, 2k, …, as the official ``batch_idx % interval``),
with D's Adam corrected for the extra updates (``gan_optimizers``) — StyleGAN2's R1.

Also here: what a trained GAN is (``GANModel``), its saving and loading, and unconditional sampling.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ctrlgen.data.tensors import image_tensor
from ctrlgen.progress import tqdm
from ctrlgen.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

# d_loss(step) -> (discriminator loss, context for g_loss); g_loss(context) -> (generator loss, values to log);
# d_reg(context) -> (discriminator regularisation loss, values to log)
DLoss = Callable[[int], tuple[torch.Tensor, dict[str, Any]]]
GLoss = Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
DReg = GLoss


@dataclass
class GANModel:
    """A trained GAN: ``generator`` (the EMA copy for unconditional GANs), its ``config``, the method's name
    (``kind``: pgan, stylegan, pix2pixhd) and the per-step loss ``history``."""

    kind: str
    generator: nn.Module
    config: Any
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class GANSetup:
    """The networks of one run, built from the seed (``setup_gan``), and the NumPy generator its batches come from."""

    generator: nn.Module
    discriminator: nn.Module
    g_ema: nn.Module | None
    rng: np.random.Generator

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The checkpointed modules by name: g, d (and g_ema)."""
        named = {"g": self.generator, "d": self.discriminator}
        return named if self.g_ema is None else {**named, "g_ema": self.g_ema}


@dataclass(frozen=True)
class AdversarialLosses:
    """What one GAN supplies to ``train_adversarial``: its discriminator and generator losses and, with lazy
    regularisation, the discriminator's regulariser ``d_reg`` stepped every ``d_reg_interval`` steps (module doc).

    ``d_reg_interval`` k > 0 also corrects D's Adam by c = k/(k+1) (``gan_optimizers``); as in stylegan2-ada, that
    holds even when ``d_reg`` is None (γ = 0: the Dreg phase exists but has nothing to step)."""

    d_loss: DLoss
    g_loss: GLoss
    d_reg: DReg | None = None
    d_reg_interval: int = 0

    def __post_init__(self) -> None:
        if self.d_reg_interval < 0 or (self.d_reg is not None and self.d_reg_interval < 1):
            raise ValueError(f"AdversarialLosses: d_reg_interval must be >= 1 with a d_reg (>= 0 without), got "
                             f"{self.d_reg_interval}")

    def regularises(self, step: int) -> bool:
        """Whether 0-based ``step`` has a Dreg update: ``d_reg`` set and ``step`` a multiple of ``d_reg_interval``."""
        return self.d_reg is not None and step % self.d_reg_interval == 0


# --------------------------------------------------------------------------- building blocks
def config_from_section(cls, section: Mapping[str, Any], overrides: Mapping[str, Any]):
    """``cls`` from a profile section (lists become tuples); a key that is no field raises, naming it."""
    names = list(cls.__dataclass_fields__)
    unknown = sorted(set(section) - set(names)) + sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {unknown}; the fields are {', '.join(names)}")
    values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(section).items()}
    return cls(**{**values, **overrides})


def pixels(images: np.ndarray, size: int, what: str = "images") -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` images as float ``(N, 3, size, size)`` in [-1, 1] (area-resized if needed)."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise ValueError(f"{what}: expected a non-empty uint8 array (N, H, W, 3), got shape {arr.shape}")
    x = image_tensor(arr)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ (parameters; buffers copied)."""
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)
        for be, b in zip(ema.buffers(), model.buffers()):
            be.copy_(b)


def adamw(params, lr: float, betas: Sequence[float], eps: float, weight_decay: float) -> torch.optim.AdamW:
    """The GANs' optimiser: AdamW (= Adam with ``weight_decay`` 0, as the papers; the thesis's §4.7.2 AdamW in full)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def setup_gan(make_generator: Callable[[], nn.Module], make_discriminator: Callable[[], nn.Module], seed: int,
              device: str | torch.device = "cpu", ema: bool = True) -> GANSetup:
    """Seed torch with ``seed`` and build G, D and (``ema``) a frozen copy of G for the moving average, in that
    order (the order fixes the initial weights); the batches' NumPy generator is seeded with ``seed`` too."""
    torch.manual_seed(seed)
    g, d = make_generator().to(device), make_discriminator().to(device)
    g_ema = None
    if ema:
        g_ema = make_generator().to(device)
        g_ema.load_state_dict(g.state_dict())
        g_ema.requires_grad_(False)
    return GANSetup(g, d, g_ema, np.random.default_rng(seed))


def gan_optimizers(setup: GANSetup, config: Any, d_reg_interval: int = 0) -> dict[str, torch.optim.AdamW]:
    """AdamW for G and D from ``config``'s lr, adam_betas, adam_eps and weight_decay. With lazy regularisation every
    ``d_reg_interval`` steps as its own D update, D's lr and betas are corrected by c = k/(k+1) (StyleGAN2 Appendix B:
    lr·c, β^c; stylegan2-ada's ``mb_ratio``), so that k main updates plus one regularisation update move D as k
    plain ones would."""
    c = d_reg_interval / (d_reg_interval + 1) if d_reg_interval else 1.0
    args = (config.adam_eps, config.weight_decay)
    return {"g": adamw(setup.generator.parameters(), config.lr, config.adam_betas, *args),
            "d": adamw(setup.discriminator.parameters(), config.lr * c, [b ** c for b in config.adam_betas], *args)}


def _descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def adversarial_step(step: int, setup: GANSetup, optimizers: Mapping[str, torch.optim.Optimizer],
                     losses: AdversarialLosses, ema_decay: float = 0.0) -> dict[str, Any]:
    """One training step: a discriminator update on ``d_loss(step)`` (Dmain); at a regularisation step
    (``losses.regularises(step)``) a second, separate discriminator update on ``d_reg(context)`` (Dreg; the
    official phase order Dmain then Dreg); then a generator update on ``g_loss(context)``, then the EMA of G (when
    the setup has one). Returns the step's losses and logged values (``loss_d_reg`` and the regulariser's values
    only at Dreg steps)."""
    loss_d, context = losses.d_loss(step)
    _descend(optimizers["d"], loss_d)
    record: dict[str, Any] = {"loss_d": loss_d.item()}
    if losses.regularises(step):
        loss_reg, logged_reg = losses.d_reg(context)
        _descend(optimizers["d"], loss_reg)
        record.update(loss_d_reg=loss_reg.item(), **{k: _scalar(v) for k, v in logged_reg.items()})
    loss_g, logged = losses.g_loss(context)
    _descend(optimizers["g"], loss_g)
    if setup.g_ema is not None:
        ema_update(setup.g_ema, setup.generator, ema_decay)
    return {**record, "loss_g": loss_g.item(), **{k: _scalar(v) for k, v in logged.items()}}


# --------------------------------------------------------------------------- the loop
def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    state = {"np_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _resume(run_dir: Path, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
            rng: np.random.Generator) -> tuple[int, list[dict[str, float]]]:
    """Load the newest checkpoint under ``run_dir`` into the modules, optimisers and random states: (step, history)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return 0, []
    tensors, state, _ = load_checkpoint(ckpt)
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    rng.bit_generator.state = state["np_rng"]
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), list(state["history"])


def _save(run_dir: Path, step: int, modules: Mapping[str, nn.Module],
          optimizers: Mapping[str, torch.optim.Optimizer], rng: np.random.Generator, history: list) -> None:
    tensors = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    state = {"optimizers": {n: o.state_dict() for n, o in optimizers.items()}, "history": history, **_rng_state(rng)}
    save_checkpoint(run_dir, step, tensors, state)


def run_gan_training(modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
                     step_fn: Callable[[int], dict[str, float]], steps: int, rng: np.random.Generator,
                     output_dir: str | Path = "", checkpoint_every: int = 0, progress: bool = True,
                     desc: str = "GAN") -> list[dict[str, float]]:
    """The one training loop of the book's GANs: ``step_fn(step)`` (a discriminator update, a second one at a lazy
    regularisation step, and one generator update, drawing data from ``rng`` and noise from torch's global
    generator) for ``steps`` steps.

    With ``output_dir`` and ``checkpoint_every`` > 0, every module's state, the optimisers, the NumPy and
    torch random states and the history are saved (``ctrlgen.training.checkpoint``, atomic), and a rerun
    with the same ``output_dir`` resumes from the newest checkpoint: same weights as an uninterrupted run."""
    run_dir = Path(output_dir) if output_dir else None
    start, history = (0, []) if run_dir is None else _resume(run_dir, modules, optimizers, rng)
    bar = tqdm(total=steps, initial=start, disable=not progress, desc=desc, leave=False)
    for step in range(start, steps):
        history.append({"step": step + 1, **step_fn(step)})
        bar.update(1)
        if run_dir is not None and checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _save(run_dir, step + 1, modules, optimizers, rng, history)
    bar.close()
    return history


def train_adversarial(kind: str, config: Any, setup: GANSetup, losses: AdversarialLosses, output_dir: str | Path = "",
                      progress: bool = True, desc: str = "GAN") -> GANModel:
    """Train ``setup``'s networks with ``losses`` for ``config.train_steps`` steps (``adversarial_step``; AdamW from
    ``gan_optimizers``, D's corrected for ``losses.d_reg_interval``; EMA decay ``config.ema_decay``), checkpointing
    every ``config.checkpoint_every`` steps into ``output_dir`` (a rerun resumes there). Returns the EMA generator, or
    G itself when the setup has no EMA."""
    optimizers = gan_optimizers(setup, config, losses.d_reg_interval)
    decay = getattr(config, "ema_decay", 0.0)
    history = run_gan_training(setup.modules, optimizers,
                               lambda step: adversarial_step(step, setup, optimizers, losses, decay),
                               config.train_steps, setup.rng, output_dir, config.checkpoint_every, progress, desc)
    generator = setup.generator if setup.g_ema is None else setup.g_ema
    return GANModel(kind, generator.eval(), config, history)


# --------------------------------------------------------------------------- sampling, saving, loading
@torch.no_grad()
def sample_images(generator: nn.Module, latent_dim: int, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """``n`` images of an unconditional generator from z ~ N(0, I) drawn at once on a CPU generator seeded
    ``seed`` (the same z whatever ``batch_size``), in the book's convention: float32 ``(n, 3, H, W)`` in [0, 1]
    on the CPU. StyleGAN's noise inputs come from torch's generator seeded per batch: the same ``seed`` and
    ``batch_size`` give the same images."""
    if n < 1:
        raise ValueError(f"generate at least one image (n={n})")
    z_all = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    device = next(generator.parameters()).device
    generator.eval()
    out = []
    for start in range(0, n, batch_size):
        z = z_all[start:start + batch_size].to(device)
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed + start)  # noise inputs fixed by the seed, without touching the caller's stream
            out.append(((generator(z).float().clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


def save_gan(model: GANModel, folder: str | Path) -> Path:
    """Write ``model``'s generator (safetensors) and config (JSON) into ``folder``; ``load_gan`` reads them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.generator.state_dict().items()},
              str(folder / "generator.safetensors"))
    (folder / "gan.json").write_text(json.dumps({"kind": model.kind, "config": asdict(model.config),
                                                 "history": model.history}), encoding="utf-8")
    return folder


def load_gan(folder: str | Path, kind: str, config_class: type, build: Callable[[Any], nn.Module],
             label: str) -> GANModel:
    """The GAN of ``kind`` written by ``save_gan`` into ``folder``: its config rebuilt as ``config_class``, its
    generator as ``build(config)`` (frozen, eval mode); a folder holding another kind raises, naming ``label``."""
    found, fields_, tensors, history = load_gan_parts(folder)
    if found != kind:
        raise ValueError(f"{folder} holds a {found!r} model, not {label}")
    config = config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields_.items()})
    generator = build(config)
    generator.load_state_dict(tensors)
    return GANModel(kind, generator.eval().requires_grad_(False), config, history)


def load_gan_parts(folder: str | Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], list[dict]]:
    """(kind, config fields, generator tensors, history) of a folder written by ``save_gan``."""
    folder = Path(folder)
    meta_file, weights = folder / "gan.json", folder / "generator.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder}: expected gan.json and generator.safetensors written by save_gan")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    return meta["kind"], meta["config"], load_file(str(weights)), meta["history"]


__all__ = [
    "GANModel", "GANSetup", "AdversarialLosses", "DLoss", "GLoss", "DReg", "config_from_section", "pixels",
    "ema_update", "adamw", "setup_gan", "gan_optimizers", "adversarial_step", "run_gan_training", "train_adversarial",
    "sample_images", "save_gan", "load_gan", "load_gan_parts",
]
