"""Profiles and overrides: every profile complete, bad keys and types refused with a useful message."""
from __future__ import annotations

import ast
import contextlib
import fnmatch
import io
import json
import tokenize
from pathlib import Path

import pytest

from ctrlgen import paths
from ctrlgen.config import (READS_ENV, SCHEMA, Config, ConfigError, _read_profile, attention_sides, available_profiles,
                            config_reads, flatten, load_profile, parse_assignments, range_problems, reset_config_reads)

ROOT = Path(__file__).resolve().parents[1]


def _types(cfg):
    return {k: (float if isinstance(v, int) and not isinstance(v, bool) else type(v)) for k, v in flatten(cfg).items()}


def test_three_profiles_exist():
    assert {"smoke", "mini", "full"} <= set(available_profiles())


@pytest.mark.parametrize("name", ["smoke", "full"])
def test_profiles_define_the_same_keys_with_the_same_types(name):
    reference = flatten(load_profile("mini"))
    other = flatten(load_profile(name))
    assert sorted(other) == sorted(reference), set(other) ^ set(reference)
    for key, value in reference.items():
        a, b = value, other[key]
        numeric = (int, float)
        if isinstance(a, bool) or isinstance(b, bool):
            assert type(a) is type(b), key
        elif isinstance(a, numeric) and isinstance(b, numeric):
            assert isinstance(a, float) == isinstance(b, float), f"{key}: {a!r} vs {b!r}"
        else:
            assert type(a) is type(b), f"{key}: {type(a).__name__} vs {type(b).__name__}"


@pytest.mark.parametrize("name", ["smoke", "mini", "full"])
def test_profiles_have_no_nulls(name):
    assert all(v is not None for v in flatten(load_profile(name)).values())


def test_override_nested_key_with_type_conversion():
    cfg = load_profile("smoke", parse_assignments(["ch02.toy.train_steps=7", "ch02.toy.lr=1e-4", "seed=3"]))
    assert cfg.ch02.toy.train_steps == 7 and isinstance(cfg.ch02.toy.train_steps, int)
    assert cfg.ch02.toy.lr == pytest.approx(1e-4) and isinstance(cfg.ch02.toy.lr, float)
    assert cfg["ch02.toy.train_steps"] == 7 and cfg.seed == 3
    assert cfg.overrides == {"ch02.toy.train_steps": 7, "ch02.toy.lr": 1e-4, "seed": 3}
    assert load_profile("smoke").ch02.toy.train_steps != 7  # the file itself is untouched


def test_int_accepted_for_float_but_not_the_reverse():
    assert load_profile("smoke", {"ch02.toy.lr": 1}).ch02.toy.lr == 1.0
    with pytest.raises(ConfigError, match=r"ch02.toy.train_steps: expected int"):
        load_profile("smoke", {"ch02.toy.train_steps": "2.5"})


def test_unknown_key_is_refused_naming_it_and_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        load_profile("smoke", {"ch02.toy.train_step": "5"})
    message = str(err.value)
    assert "'ch02.toy.train_step'" in message and "ch02.toy.train_steps" in message and "Allowed keys" in message


def test_section_is_not_a_value():
    with pytest.raises(ConfigError, match="is a section"):
        load_profile("smoke", {"ch02.toy": "3"})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"seed: expected int.*got str 'abc'"):
        load_profile("smoke", {"seed": "abc"})
    with pytest.raises(ConfigError, match=r"expected str"):
        load_profile("smoke", {"ch02.toy.distribution": 3})


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown profile 'huge'.*full, mini, smoke"):
        load_profile("huge")


@pytest.mark.parametrize("bad", ["novalue", "=3", ""])
def test_malformed_assignment(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments([bad])


def test_config_is_read_only_and_reports_missing_attributes():
    cfg = load_profile("smoke")
    with pytest.raises(TypeError):
        cfg["seed"] = 1  # Mapping has no __setitem__
    with pytest.raises(AttributeError, match="no key 'nope'"):
        _ = cfg.nope


def test_data_root_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.ENV_DATA, raising=False)
    assert paths.data_root(load_profile("smoke")) == paths.project_root() / "data"
    cfg = load_profile("smoke", {"paths.data_root": str(tmp_path / "from_profile")})
    assert paths.data_root(cfg) == tmp_path / "from_profile"
    monkeypatch.setenv(paths.ENV_DATA, str(tmp_path / "from_env"))
    assert paths.data_root(cfg) == tmp_path / "from_env"


def test_relative_profile_paths_are_relative_to_the_project(monkeypatch):
    monkeypatch.delenv(paths.ENV_CACHE, raising=False)
    cfg = load_profile("smoke", {"paths.cache_root": "elsewhere/cache"})
    assert paths.cache_root(cfg) == paths.project_root() / "elsewhere" / "cache"


def test_resolve_device(monkeypatch):
    import torch

    from ctrlgen.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(load_profile("smoke", {"device": "auto"})) == "cpu"
    assert resolve_device(load_profile("smoke", {"device": "cpu"})) == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        resolve_device(load_profile("smoke", {"device": "cuda"}))
    with pytest.raises(ConfigError, match="device = 'tpu'.*not allowed.*'cuda:N'"):
        resolve_device({"device": "tpu"})  # a plain mapping, not checked by load_profile
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(load_profile("full")) == "cuda"
    assert resolve_device(load_profile("smoke", {"device": "cuda:1"})) == "cuda:1"
    with pytest.raises(ConfigError, match="has 2 CUDA device"):
        resolve_device(load_profile("smoke", {"device": "cuda:2"}))


# --------------------------------------------------------------------------- value ranges and choices
@pytest.mark.parametrize("name", ["smoke", "mini", "full"])
def test_shipped_profiles_pass_the_range_checks(name):
    assert range_problems(_read_profile(name)) == []


def test_every_schema_pattern_names_existing_keys():
    """A renamed key must not silently lose its check."""
    keys = flatten(_read_profile("mini"))
    assert [p for p in SCHEMA if not any(fnmatch.fnmatchcase(k, p) for k in keys)] == []


@pytest.mark.parametrize("key, value, allowed", [
    ("ch02.toy.train_steps", "-5", "a number >= 1 (training steps)"),       # a step count
    ("ch02.toy.train_steps", "0", "a number >= 1"),                          # zero training is meaningless
    ("sampling.num_steps", "0", "a number >= 1 (sampling steps)"),
    ("didgen.finetune.warmup_steps", "-1", "a number >= 0"),                 # zero warm-up is fine, negative is not
    ("pretrain.unet.batch_size", "0", "a number >= 1"),
    ("didgen.pairs.guidance_fraction", "1.5", "a number in [0, 1]"),         # a fraction
    ("pretrain.unet.prompt_dropout", "-0.1", "a number in [0, 1]"),
    ("didgen.finetune.lr", "0", "a number > 0"),
    ("device", "tpu", "'cpu', 'cuda', 'cuda:N' (N = GPU index), 'mps' or 'auto'"),  # a device
    ("device", "cuda:x", "'cuda:N'"),
    ("sampling.scheduler", "euler", "one of 'ddim', 'pndm', 'ddpm'"),        # a scheduler the code has
    ("ch02.toy.beta_schedule", "cosine", "one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'"),
    ("training.mixed_precision", "fp8", "one of 'no', 'fp16', 'bf16'"),
    ("attention.cross_res", "[12]", "a non-empty list, each a power of two"),  # a resolution
    ("attention.cross_res", "[]", "a non-empty list"),
    ("attention.places", "[down, side]", "each one of 'down', 'mid', 'up'"),
    ("models.image_size", "48", "a power of two >= 8 (pixels)"),
    ("attention.smoothing_kernel", "4", "an odd integer >= 1"),
    ("data.split_fractions", "[0.8, 0.3, 0.1]", "summing to 1"),
    ("didgen.finetune.adam_betas", "[0.9, 1.0]", "two numbers in [0, 1) (AdamW betas)"),
    ("didgen.eval.box_topk_frac", "0", "a number in (0, 1] (BoxDiff's P)"),
    ("didgen.pairs.augment_scale", "[1.2, 0.8]", "two numbers 0 < low <= high"),
    ("claims.seeds", "0", "a number >= 1 (training seeds per claim)"),
])
def test_out_of_range_values_are_refused_naming_key_value_and_range(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_profile("smoke", {key: value})
    message = str(err.value)
    assert message.startswith(f"{key} = ") and "(-p override) is not allowed: expected" in message, message
    assert allowed in message, message


def test_attention_sides_are_the_models_own():
    """Latent side = image side / VAE factor; attention at that side and each halving the U-Net has."""
    assert attention_sides(load_profile("smoke").models) == [8, 4]     # 32 px / 2^(3-1) = 8; two U-Net levels
    assert attention_sides(load_profile("mini").models) == [16, 8]     # 64 px / 4 = 16
    assert attention_sides(load_profile("full").models) == [64, 32, 16, 8]  # SD: 512 / 8 = 64, four levels
    with pytest.raises(ConfigError, match=r"attention.cross_res = \[16\].*attention sides this model has at 32 px: \[8, 4\]"):
        load_profile("smoke", {"attention.cross_res": "[16]"})
    assert load_profile("smoke", {"attention.cross_res": "[4]"}).attention.cross_res == [4]
    with pytest.raises(ConfigError, match="a divisor of every block_out_channels"):
        load_profile("smoke", {"models.mini.unet.norm_num_groups": "24"})
    with pytest.raises(ConfigError, match=r"models.mini.vae.block_out_channels = \[16, 32, 32\].*one width at every level"):
        load_profile("smoke", {"models.mini.vae.block_out_channels": "[16, 32, 32]"})
    with pytest.raises(ConfigError, match=r"pretrain.default_variant = 'plain'.*one of pretrain.variants"):
        load_profile("smoke", {"pretrain.variants": "[selfattn]", "pretrain.default_variant": "plain"})
    with pytest.raises(ConfigError, match=r"didgen.eval.attention_timestep = 1000.*\[0, 999\]"):
        load_profile("smoke", {"didgen.eval.attention_timestep": "1000"})


def test_several_problems_are_listed_together():
    with pytest.raises(ConfigError) as err:
        load_profile("smoke", {"seed": "-1", "ch02.toy.train_steps": "-5"})
    assert str(err.value).startswith("invalid profile values:")
    assert "seed = -1" in str(err.value) and "ch02.toy.train_steps = -5" in str(err.value)


def test_schema_choices_are_what_the_code_supports():
    from ctrlgen.experiments import base_models, ch02_background
    from ctrlgen.data.readers.common import VERIFY_MODES
    from ctrlgen.models.registry import DTYPES
    from ctrlgen.models.sd import SCHEDULERS

    def choices(key: str) -> set:
        rule = SCHEMA[key]
        return {c for c in ("ddim", "pndm", "ddpm", "euler", "eight_gaussians", "two_moons", "swiss_roll", "moons",
                            "full", "header", "none", "all", "selfattn", "plain", "float32", "float16", "bfloat16",
                            "float64") if rule.ok(c)}

    assert choices("sampling.scheduler") == set(SCHEDULERS)
    assert choices("ch02.toy.distribution") == set(ch02_background.TOY_DISTRIBUTIONS)
    assert choices("data.verify") == set(VERIFY_MODES)
    assert choices("pretrain.default_variant") == set(base_models.VARIANTS)
    assert choices("models.dtype") == set(DTYPES)


# --------------------------------------------------------------------------- which keys a run reads
def test_reads_are_tracked_per_leaf_and_written_to_the_reads_file(monkeypatch, tmp_path):
    target = tmp_path / "reads.json"
    monkeypatch.setenv(READS_ENV, str(target))
    reset_config_reads()
    cfg = load_profile("smoke")
    assert config_reads() == set() and not target.exists()  # loading and checking is not reading
    _ = cfg.ch02.toy.train_steps, cfg["seed"], cfg.get("device"), cfg.didgen  # a section alone is not a read
    dict(cfg.didgen.pairs)  # reading a section's items reads its leaves
    expected = {"ch02.toy.train_steps", "seed", "device"} | {f"didgen.pairs.{k}" for k in load_profile("smoke").didgen.pairs}
    assert config_reads() == expected
    assert set(json.loads(target.read_text())) == expected
    reset_config_reads()
    cfg.models.mini.to_dict()
    assert config_reads() == {f"models.mini.{k}" for k in flatten(_read_profile("smoke")["models"]["mini"])}
    reset_config_reads()
    Config({"seed": 1}).seed  # a Config built by hand is not a profile: not tracked
    assert config_reads() == set()


# --------------------------------------------------------------------------- keys nothing reads
# Profile keys known to be read by no code yet. Each is a defect with an owner; the coordinator empties this
# list as they are wired in. A key that becomes read must leave the list (test_allow_list_is_current).
NOT_READ_YET: dict[str, str] = {}


def _code_words() -> set[str]:
    """Identifiers and plain string literals in lib/ctrlgen and chapters/ (comments and docstrings' prose are
    not words here). config.py is left out: its schema names keys to check them, not to use them."""
    words: set[str] = set()
    files = [*(ROOT / "lib" / "ctrlgen").rglob("*.py"), *(ROOT / "chapters").glob("*.py")]
    for file in files:
        if file == ROOT / "lib" / "ctrlgen" / "config.py":
            continue
        for token in tokenize.generate_tokens(io.StringIO(file.read_text(encoding="utf-8")).readline):
            if token.type == tokenize.NAME:
                words.add(token.string)
            elif token.type == tokenize.STRING:
                with contextlib.suppress(ValueError, SyntaxError):
                    value = ast.literal_eval(token.string)
                    if isinstance(value, str):
                        words.add(value)
    return words


def _unread_keys(extra_profile: dict | None = None) -> set[str]:
    """Leaf keys of the three profiles of which some path component appears nowhere in the code.

    Static on purpose: the tracking view (``config_reads``) sees only what one run on one profile
    touches, so a key used only on ``full`` (the VLM captioner) would look unread on smoke, and running
    every chapter is minutes. A component is "read" as an attribute or keyword (``cfg.didgen.pairs.eta``,
    ``PairConfig(eta=...)``) or as a string (``cfg["eta"]``). A key under a section indexed by another
    key's value (``models.pretrained[models.domains.derm]``) is read when that value names it.
    """
    words = _code_words()
    profiles = [flatten(_read_profile(name)) for name in available_profiles()] + ([flatten(extra_profile)] if extra_profile else [])
    values = {v for flat in profiles for v in flat.values() if isinstance(v, str)}
    unread = set()
    for key in set().union(*profiles):
        parts = key.split(".")
        if all(p in words for p in parts):
            continue
        if all(p in words for p in parts[:-1]) and parts[-1] in values:
            continue  # looked up by the value of another key
        unread.add(key)
    return unread


def test_every_profile_key_is_read_by_some_code():
    unread = _unread_keys() - set(NOT_READ_YET)
    assert not unread, f"profile keys no code reads (wire them in, or remove them from the profiles): {sorted(unread)}"


def test_allow_list_is_current():
    assert set(NOT_READ_YET) <= _unread_keys(), f"read now, remove from NOT_READ_YET: {set(NOT_READ_YET) - _unread_keys()}"


def test_unread_key_detection_can_fail():
    """The detector finds a key nothing reads, and accepts a key read only through another key's value."""
    unread = _unread_keys({"sampling": {"zq_never_read_key": 1}})
    assert "sampling.zq_never_read_key" in unread
    assert "models.pretrained.sd21" not in _unread_keys()


def test_schema_model_names_are_the_downstream_zoo():
    from ctrlgen import config
    from ctrlgen.downstream import CLASSIFIERS, SEGMENTERS

    assert config.SEGMENTER_NAMES == tuple(SEGMENTERS) and config.CLASSIFIER_NAMES == tuple(CLASSIFIERS)
    with pytest.raises(ConfigError, match="downstream.segmentation.models"):
        load_profile("smoke", {"downstream.segmentation.models": ["unet", "segformer"]})
    with pytest.raises(ConfigError, match="ch03.attencraft.omega"):
        load_profile("smoke", {"ch03.attencraft.omega": 1.5})


def test_unknown_key_error_lists_only_the_nearest_section():
    """The message names the keys of the deepest existing section, not the whole profile."""
    with pytest.raises(ConfigError) as err:
        load_profile("mini", {"ch02.toy.nonsense": 1})
    message = str(err.value)
    assert "Allowed keys in 'ch02.toy'" in message and "ch02.toy.train_steps" in message and "pretrain." not in message
    with pytest.raises(ConfigError) as err:
        load_profile("mini", {"nonsense": 1})
    assert "Allowed sections:" in str(err.value) and "pretrain" in str(err.value) and "pretrain.unet" not in str(err.value)
