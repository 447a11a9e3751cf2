"""Profiles and overrides: every profile complete, bad keys and types refused with a useful message."""
from __future__ import annotations

import pytest

from ctrlgen import paths
from ctrlgen.config import ConfigError, available_profiles, flatten, load_profile, parse_assignments


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
    with pytest.raises(ConfigError, match="device must be"):
        resolve_device(load_profile("smoke", {"device": "tpu"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(load_profile("full")) == "cuda"
