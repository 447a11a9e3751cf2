"""Profiles: the same code at three scales (DESIGN.md §2).

A profile is a YAML file in ``lib/ctrlgen/profiles/`` (``smoke``, ``mini``, ``full``). Every profile
defines every key, so a profile is also the schema its overrides are checked against: an override
must name an existing key (nested keys with dots, ``ch02.toy.train_steps=200``) and give a value
of the same type. Unknown keys and wrong types are refused with a message that names the key and
the allowed ones, before anything runs.

Values are range-checked too (``SCHEMA`` below: step counts, fractions, devices, schedulers, attention
sides the model has), for the whole merged profile, so ``-p device=tpu`` stops before a kernel starts.

A profile loaded with :func:`load_profile` remembers which leaf keys were read (``config_reads``); with
``$CTRLGEN_CONFIG_READS`` set to a file, every newly read key is also written there. ``ctrlgen book``
uses this to key an executed chapter on the values it actually read.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PROFILE_PACKAGE = "ctrlgen.profiles"
READS_ENV = "CTRLGEN_CONFIG_READS"  # file that receives the dotted keys this process read (set by ctrlgen book)

_READ_KEYS: set[str] = set()


class ConfigError(ValueError):
    """A profile or an override that cannot be used; the message says why and what is allowed."""


def available_profiles() -> list[str]:
    """Names of the profiles shipped with the package, sorted."""
    folder = resources.files(PROFILE_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_profile(name: str) -> dict[str, Any]:
    names = available_profiles()
    if name not in names:
        raise ConfigError(f"unknown profile {name!r}; available profiles: {', '.join(names)}")
    text = resources.files(PROFILE_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {name!r} must be a mapping at the top level")
    return data


class Config(Mapping):
    """A read-only nested mapping with attribute access (``cfg.ch02.toy.train_steps``).

    ``profile_name`` and ``overrides`` record where the values came from, for result records.
    """

    def __init__(self, data: Mapping[str, Any], profile_name: str = "", overrides: Mapping[str, Any] | None = None,
                 *, _prefix: str = "", _track: bool = False):
        self._prefix = _prefix
        self._track = _track
        self._data = {k: Config(v, _prefix=f"{_prefix}{k}.", _track=_track) if isinstance(v, Mapping) else v
                      for k, v in data.items()}
        self.profile_name = profile_name
        self.overrides = dict(overrides or {})

    def _leaf(self, key: str) -> Any:
        value = self._data[key]
        if self._track and not isinstance(value, Config):
            _record_read(self._prefix + key)
        return value

    def __getitem__(self, key: str) -> Any:
        if "." in key:
            node: Any = self
            for part in key.split("."):
                node = node[part]
            return node
        return self._leaf(key)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key in ("profile_name", "overrides"):
            raise AttributeError(key)
        try:
            return self._leaf(key)
        except KeyError:
            raise AttributeError(f"no key {key!r}; keys here: {', '.join(self._data)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        label = f" profile={self.profile_name!r}" if self.profile_name else ""
        return f"Config({self.to_dict()!r}{label})"

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict copy (for JSON records and papermill parameters); counts as reading every leaf."""
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(self._leaf(k)) for k, v in self._data.items()}


# ---------------------------------------------------------------- which keys a run read
def _record_read(dotted: str) -> None:
    """Remember that ``dotted`` was read; a first read is also written to ``$CTRLGEN_CONFIG_READS``."""
    if dotted in _READ_KEYS:
        return
    _READ_KEYS.add(dotted)
    target = os.environ.get(READS_ENV)
    if target:
        _write_reads(Path(target))


def _write_reads(path: Path) -> None:
    # Atomic (temporary file + replace): the parent may read the file while the kernel still runs.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(sorted(_READ_KEYS), handle)
    os.replace(tmp, path)


def config_reads() -> set[str]:
    """Dotted leaf keys read so far in this process from any profile loaded with :func:`load_profile`."""
    return set(_READ_KEYS)


def reset_config_reads() -> None:
    """Forget the keys read so far (tests; a long-lived process starting a new run)."""
    _READ_KEYS.clear()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; the dotted keys overrides use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list"}.get(type(value), type(value).__name__)


def coerce(key: str, value: Any, reference: Any) -> Any:
    """Return ``value`` converted to the type of ``reference`` or raise ConfigError.

    Strings from the command line are parsed as YAML first (``3`` -> 3, ``[1, 2]`` -> list).
    An int is accepted where a float is expected; nothing else is converted silently.
    """
    if isinstance(value, str) and not isinstance(reference, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot parse {value!r}: {err}") from None
        if isinstance(reference, float) and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                value = float(value)
            except ValueError:
                pass
    if isinstance(reference, bool):
        ok = isinstance(value, bool)
    elif isinstance(reference, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(reference, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(reference, list):
        ok = isinstance(value, list)
    elif isinstance(reference, str):
        ok = isinstance(value, str)
    else:
        ok = type(value) is type(reference)
    if not ok:
        raise ConfigError(
            f"{key}: expected {_type_name(reference)} (like the profile's {reference!r}), got {_type_name(value)} {value!r}"
        )
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _allowed_near(key: str, allowed: Mapping[str, Any]) -> str:
    """The keys of the deepest existing section above ``key`` (the top-level sections if none): a few hundred
    keys of the whole profile would bury the one line that matters."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth]) + "."
        keys = sorted(k for k in allowed if k.startswith(prefix))
        if keys:
            return f"Allowed keys in {prefix[:-1]!r}: {', '.join(keys)}"
    return f"Allowed sections: {', '.join(sorted({k.split('.')[0] for k in allowed}))}"


def validate_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``overrides`` (dotted key -> value) against ``base``; return them type-converted."""
    allowed = flatten(base)
    checked: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in allowed:
            if any(k.startswith(key + ".") for k in allowed):
                sub = sorted(k for k in allowed if k.startswith(key + "."))
                raise ConfigError(f"{key!r} is a section, not a value; set one of: {', '.join(sub)}")
            close = difflib.get_close_matches(key, allowed, n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"unknown key {key!r}.{hint} {_allowed_near(key, allowed)}")
        checked[key] = coerce(key, value, allowed[key])
    return checked


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}`` (values stay strings; see ``coerce``)."""
    parsed: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parsed[key.strip()] = value
    return parsed


# ---------------------------------------------------------------- value ranges and choices
@dataclass(frozen=True)
class Rule:
    """What the values of the keys matching a pattern may be: a predicate and the same in words."""

    ok: Callable[[Any], bool]
    allowed: str


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low: float, what: str = "") -> Rule:
    """A number ≥ ``low``."""
    return Rule(lambda v: _number(v) and v >= low, f"a number >= {low:g}{what}")


def positive(what: str = "") -> Rule:
    """A number > 0 (learning rates, scales, widths)."""
    return Rule(lambda v: _number(v) and v > 0, f"a number > 0{what}")


def between(low: float, high: float) -> Rule:
    """A number in the closed interval [low, high] (fractions, probabilities, decays)."""
    return Rule(lambda v: _number(v) and low <= v <= high, f"a number in [{low:g}, {high:g}]")


def one_of(*choices: str) -> Rule:
    """One of the named strings (what the code supports)."""
    return Rule(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def each(rule: Rule, non_empty: bool = True) -> Rule:
    """A list whose every element satisfies ``rule``."""
    words = f"a {'non-empty ' if non_empty else ''}list, each {rule.allowed}"
    return Rule(lambda v: isinstance(v, list) and (bool(v) or not non_empty) and all(rule.ok(x) for x in v), words)


def _power_of_two(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


POWER_OF_TWO = Rule(_power_of_two, "a power of two")
ODD = Rule(lambda v: isinstance(v, int) and v >= 1 and v % 2 == 1, "an odd integer >= 1")
DEVICE = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", v) is not None,
              "'cpu', 'cuda', 'cuda:N' (N = GPU index), 'mps' or 'auto'")
PLACES = each(one_of("down", "mid", "up"))
DTYPE = one_of("float32", "float16", "bfloat16")  # models/registry.py DTYPES

# Patterns are fnmatch patterns on dotted keys (``*`` also crosses dots); every matching rule applies.
# Choices name what the code supports, and tests/test_config.py checks them against the code's own lists.
SEGMENTER_NAMES = ("unet", "attention_unet", "dcsau_net", "xboundformer", "fat_net")
CLASSIFIER_NAMES = ("vgg16", "resnet18", "densenet121", "vit_b_16", "efficientnet_v2_s", "mobilenet_v2")

SCHEMA: dict[str, Rule] = {
    "seed": at_least(0),
    "device": DEVICE,
    "jobs": at_least(1),
    # step and sample counts: zero is allowed only where it means "none" or "off"
    "*steps": at_least(0),
    "*.train_steps": at_least(1, " (training steps)"),
    "*.ddim_steps": at_least(1, " (sampling steps)"),
    "*.num_steps": at_least(1, " (sampling steps)"),
    "*.inversion_steps": at_least(1, " (inversion steps)"),
    "*.sample_steps": at_least(1, " (sampling steps)"),
    "*.finetune.steps": at_least(1, " (training steps)"),
    "pretrain.*.steps": at_least(1, " (training steps)"),
    "pretrain.unet.plain_steps": at_least(1, " (training steps)"),
    "*.segmenter_steps": at_least(1, " (training steps)"),
    "*.edit_inner_steps": at_least(1, " (optimizer iterations per step)"),
    "training.gradient_accumulation_steps": at_least(1),
    "*num_train_timesteps": at_least(1, " (diffusion steps T)"),
    "*batch_size": at_least(1),
    "*_batch": at_least(1),
    "*checkpoint_every": at_least(0, " (0 = never)"),
    "training.keep_checkpoints": at_least(1),
    "*.n_*": at_least(0),
    "ch02.toy.n_*": at_least(1),
    "ch02.toy.chain_samples": at_least(1),
    "*max_samples": at_least(0, " (0 = all)"),
    "*max_train": at_least(0, " (0 = all)"),
    "*lpips_pairs": at_least(0, " (0 = every pair)"),
    "*.dreambooth_class_images": at_least(1),
    # optimisation
    "*lr": positive(),
    "*weight_decay": at_least(0),
    "*max_grad_norm": positive(),
    "*ema_decay": between(0, 1),
    "training.lora_rank": at_least(1),
    "training.mixed_precision": one_of("no", "fp16", "bf16"),  # Accelerate's names
    # fractions and probabilities
    "*fraction": between(0, 1),
    "*probability": between(0, 1),
    "*prompt_dropout": between(0, 1),
    "*.texture": between(0, 1),
    "data.split_fractions": Rule(lambda v: isinstance(v, list) and len(v) == 3 and all(_number(x) and 0 <= x <= 1 for x in v)
                                 and abs(sum(v) - 1) < 1e-6, "three fractions in [0, 1] (train, val, test) summing to 1"),
    # schedulers and named choices: what the code implements
    "sampling.scheduler": one_of("ddim", "pndm", "ddpm"),  # models/sd.py SCHEDULERS
    "*beta_schedule": one_of("linear", "scaled_linear", "squaredcos_cap_v2"),  # diffusers' DDPM/DDIM schedules
    "*prediction_type": one_of("epsilon", "v_prediction"),  # training targets and samplers follow diffusers' names
    "*timestep_spacing": one_of("leading", "trailing"),  # the spacings both DDIMScheduler and DDIMInverseScheduler know
    "ch02.toy.distribution": one_of("eight_gaussians", "two_moons", "swiss_roll"),  # experiments.ch02_background.TOY_DISTRIBUTIONS
    "*guidance_scale": at_least(0),
    "models.kind": one_of("mini", "pretrained"),
    "models.dtype": DTYPE,
    "*.vlm_dtype": DTYPE,
    "models.image_size": Rule(lambda v: _power_of_two(v) and v >= 8, "a power of two >= 8 (pixels)"),
    "models.mini.*.block_out_channels": each(at_least(1)),
    "models.mini.*layers_per_block": at_least(1),
    "models.mini.vae.blocks_per_level": at_least(1),
    "models.mini.*num_groups": at_least(1),
    "models.mini.unet.attention_heads": at_least(1),
    "models.mini.text_encoder.*": at_least(1),
    "models.mini.scheduler.beta_start": between(0, 1),
    "models.mini.scheduler.beta_end": between(0, 1),
    "models.mini.tokenizer.*": at_least(1),
    "attention.*res": each(POWER_OF_TWO),
    "*places": PLACES,
    "attention.smoothing_kernel": ODD,
    "attention.smoothing_sigma": positive(),
    "attention.text_softmax_scale": positive(),
    "pretrain.variants": each(one_of("selfattn", "plain")),  # pretrain.VARIANTS
    "pretrain.default_variant": one_of("selfattn", "plain"),
    "pretrain.self_attention_loss.weight": at_least(0),
    # chapters 3-6 (downstream harness, AttenCraft, bias analysis): names as ctrlgen.downstream lists them
    # (tests/test_config.py checks they agree; config is layer 1 and cannot import them)
    "*max_epochs": at_least(1),
    "*patience": at_least(1, " (epochs without improvement)"),
    "*.optimizer": one_of("adam", "sgd"),
    "*classification.sampling": one_of("shuffle", "balanced"),  # downstream.train.SAMPLINGS
    "*classification.val_metric": one_of("accuracy", "macro_f1"),  # downstream.train.VAL_METRICS
    "*.momentum": Rule(lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "*segmentation.size": one_of("mini", "full"),
    "*segmentation.models": each(one_of(*SEGMENTER_NAMES)),
    "*classification.models": each(one_of(*CLASSIFIER_NAMES)),
    "didgen.pairs.grad_normalize": one_of("none", "max"),  # guidance.GuidanceRefiner.normalize
    "didgen.pairs.softmax_scale": positive(),
    "*max_train_images": at_least(0, " (0 = all)"),
    "*max_eval_images": at_least(0, " (0 = all)"),
    "gan_baselines.*.image_size": POWER_OF_TWO,
    "gan_baselines.*.channels": each(at_least(1)),
    "*latent_dim": at_least(1),
    "*z_dim": at_least(1),
    "*w_dim": at_least(1),
    "*mapping_layers": at_least(1),
    "*r1_interval": at_least(1),
    "*mbstd_group": at_least(1),
    "*.ngf": at_least(1),
    "*.ndf": at_least(1),
    "*.num_d": at_least(1),
    "*gp_weight": at_least(0),
    "*drift_weight": at_least(0),
    "*r1_gamma": at_least(0),
    "*.lambda_*": at_least(0),
    "*conditioning_scale": at_least(0),
    "*mapping_lr_mult": positive(),
    "ch03.attencraft.gamma": between(0, 1),
    "ch03.attencraft.omega": between(0, 1),
    "ch03.ablations.omegas": each(between(0, 1)),
    "ch03.attencraft.t_max": Rule(lambda v: _number(v) and 0 <= v < 1000, "a timestep in [0, 1000)"),
    "ch03.attencraft.nu": positive(),
    "ch03.attencraft.tau": positive(),
    "ch03.attencraft.alpha": at_least(0),
    "ch03.attencraft.score_times": each(at_least(0)),
    "pretrain.unet.noise_offset": at_least(0),
    "pretrain.unet.curve_points": at_least(1, " (1 = the final model only)"),
    "pretrain.self_attention_loss.res": each(POWER_OF_TWO),
    "*timestep": at_least(0),
    "*feature_side": at_least(1),
    "*feature_grid": at_least(1),
    "data.resolution": at_least(8, " (pixels)"),
    "data.verify": one_of("full", "header", "none"),  # data/readers/common.py VERIFY_MODES
    "data.source": one_of("auto", "real", "procedural"),
    "data.attributes.low_contrast_threshold": at_least(0),
    "data.attributes.patch_size": at_least(1),
    "didgen.dermprompt.captioner": one_of("attributes", "vlm"),
    "didgen.dermprompt.max_*": at_least(1),
    "didgen.dermprompt.vlm_max_new_tokens": at_least(1),
    "didgen.finetune.alpha": at_least(0),
    "*warmup_steps": at_least(0),
    "didgen.pairs.eta": at_least(0),
    "didgen.pairs.tau": at_least(0),
    "didgen.pairs.dilate": at_least(0, " (pixels)"),
    "didgen.pairs.erode": at_least(0, " (pixels)"),
    "didgen.baselines.dreambooth_prior_weight": at_least(0),
    "didgen.eval.eval_size": at_least(8, " (pixels)"),
    "didgen.eval.ms_ssim_scales": at_least(1),
    "didgen.eval.ms_ssim_kernel": ODD,
    "didgen.eval.segmenter_channels": each(at_least(1)),
    "didgen.metrics.extractor": one_of("inception", "domain_vae"),  # metrics/image.py metric_extractors
    "*.adam_betas": Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(_number(x) and 0 <= x < 1 for x in v),
                         "two numbers in [0, 1) (AdamW betas)"),
    "*.adam_eps": positive(),
    "*.augment_scale": Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v)
                            and 0 < v[0] <= v[1], "two numbers 0 < low <= high (scale range)"),
    "*.box_topk_frac": Rule(lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1] (BoxDiff's P)"),
    "*.box_corner_pixels": at_least(0, " (BoxDiff's L)"),
    "*.edit_lr_decay_steps": at_least(1),
    "*.edit_early_stop*": at_least(0),
    "claims.seeds": at_least(1, " (training seeds per claim)"),
    "pretrain.quality_bar.classifier_steps": at_least(1, " (training steps)"),
    "pretrain.quality_bar.class_metric": one_of("accuracy", "balanced accuracy"),  # analysis.quality_bar.score
    "pretrain.quality_bar.min_count": at_least(1),
    "pretrain.quality_bar.n_samples": at_least(2),
    "pretrain.quality_bar.*_threshold": between(0, 1),
    "pretrain.quality_bar.min_affinity": at_least(1, " (1.0 = no structure)"),
}


def vae_factor(models: Mapping[str, Any]) -> int:
    """Pixels per latent cell: 8 for the SD checkpoints, ``2^(len(block_out_channels) - 1)`` for a mini VAE."""
    if models["kind"] == "pretrained":
        return 8
    return 2 ** (len(models["mini"]["vae"]["block_out_channels"]) - 1)


def attention_sides(models: Mapping[str, Any]) -> list[int]:
    """Sides of the U-Net's attention maps at ``models.image_size`` (largest first).

    SD 1.x/2.x: attention at the latent side and three halvings (64, 32, 16, 8 for 512 px); the mini
    U-Net has attention at every level of ``unet.block_out_channels``.
    """
    latent = models["image_size"] // vae_factor(models)
    levels = 4 if models["kind"] == "pretrained" else len(models["mini"]["unet"]["block_out_channels"])
    return [latent >> i for i in range(levels) if latent >> i >= 1]


def _cross_key_problems(data: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """Constraints between keys: sizes the model has, groups that divide widths, a default among choices."""
    problems: list[tuple[str, Any, str]] = []
    models = data["models"]
    if models["image_size"] % vae_factor(models):
        problems.append(("models.image_size", models["image_size"], f"a multiple of the VAE factor {vae_factor(models)}"))
        return problems
    sides = attention_sides(models)
    resolutions = [f"attention.{k}" for k in ("cross_res", "self_res", "train_cross_res")]
    if models["kind"] == "mini":  # pretraining acts on the mini U-Net only
        resolutions.append("pretrain.self_attention_loss.res")
    flat = flatten(data)
    for key in resolutions:
        if any(side not in sides for side in flat[key]):
            problems.append((key, flat[key], f"attention sides this model has at {models['image_size']} px: {sides}"))
    mini = models["mini"]
    widths = mini["vae"]["block_out_channels"]
    if len(set(widths)) != 1:
        problems.append(("models.mini.vae.block_out_channels", widths, "one width at every level (AutoencoderTiny's "
                         "stride-2 convolutions keep the channel count), e.g. [64, 64, 64]"))
    groups = mini["unet"]["norm_num_groups"]
    if any(width % groups for width in mini["unet"]["block_out_channels"]):
        problems.append(("models.mini.unet.norm_num_groups", groups,
                         f"a divisor of every block_out_channels {mini['unet']['block_out_channels']}"))
    text = mini["text_encoder"]
    if text["hidden_size"] % text["num_attention_heads"]:
        problems.append(("models.mini.text_encoder.num_attention_heads", text["num_attention_heads"],
                         f"a divisor of hidden_size {text['hidden_size']}"))
    unet = mini["unet"]
    if any(width % unet["attention_heads"] for width in unet["block_out_channels"]):
        problems.append(("models.mini.unet.attention_heads", unet["attention_heads"],
                         f"a divisor of every block_out_channels {unet['block_out_channels']}"))
    if data["pretrain"]["default_variant"] not in data["pretrain"]["variants"]:
        problems.append(("pretrain.default_variant", data["pretrain"]["default_variant"],
                         f"one of pretrain.variants {data['pretrain']['variants']}"))
    horizon = mini["scheduler"]["num_train_timesteps"]
    for key in ("pretrain.measure.timestep", "didgen.eval.attention_timestep"):
        if not 0 <= flat[key] < horizon:
            problems.append((key, flat[key], f"a timestep in [0, {horizon - 1}] (models.mini.scheduler.num_train_timesteps)"))
    return problems


def range_problems(data: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """Every (key, value, allowed) of ``data`` (a nested profile) that breaks ``SCHEMA`` or a cross-key rule."""
    problems = []
    for key, value in flatten(data).items():
        broken = [rule for pattern, rule in SCHEMA.items() if fnmatch.fnmatchcase(key, pattern) and not rule.ok(value)]
        if broken:  # SCHEMA lists general patterns before specific ones: name the most specific rule
            problems.append((key, value, broken[-1].allowed))
    return problems or _cross_key_problems(data)


def check_ranges(data: Mapping[str, Any], origin: Callable[[str], str] = lambda key: "the profile") -> None:
    """Raise ConfigError naming every out-of-range key, its value and what is allowed."""
    problems = range_problems(data)
    if problems:
        lines = [f"{key} = {value!r} ({origin(key)}) is not allowed: expected {allowed}" for key, value, allowed in problems]
        raise ConfigError("\n".join(lines) if len(lines) == 1 else "invalid profile values:\n  " + "\n  ".join(lines))


def load_profile(name: str = "mini", overrides: Mapping[str, Any] | None = None) -> Config:
    """Load profile ``name`` and apply ``overrides`` (dotted keys, values of the profile's types)."""
    data = _read_profile(name)
    checked = validate_overrides(data, overrides or {})
    merged = copy.deepcopy(data)
    for key, value in checked.items():
        _set_dotted(merged, key, value)
    check_ranges(merged, origin=lambda key: "-p override" if key in checked else f"profile {name!r}")
    return Config(merged, profile_name=name, overrides=checked, _track=True)
