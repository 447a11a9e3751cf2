"""DermPrompt (§4.3.2): measured attributes on procedural scenes with known ground truth, the token
limit with the real tokenizer, the per-image cache, VLM prompt/parse path, recombination."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctrlgen.data.worlds.dermoscopy import generate_dermoscopy
from ctrlgen.methods.didgen.dermprompt import (
    AttributeCaptioner,
    Caption,
    CaptionCache,
    DermAttributes,
    PromptSampler,
    PromptTooLongError,
    VLMCaptioner,
    compose_prompt,
    count_tokens,
    dermprompt_vocabulary,
    fit_prompt,
)
from ctrlgen.models import build_caption_tokenizer

CLEAN = {"hair_count": 0, "vignette": 0.0, "veil": False, "vessels": False}


def tokenizer(max_len=77):
    tok = build_caption_tokenizer(dermprompt_vocabulary(), model_max_length=max_len)
    tok.add_tokens(["<lesion>", "<skin>"])
    return tok


@pytest.fixture(scope="module")
def cap():
    return AttributeCaptioner(tokenizer())


def scene(seed=0, **over):
    s = generate_dermoscopy(1, seed=seed, overrides={**CLEAN, **over})
    return s.images[0], s.masks[0], s.truth.iloc[0]


def test_hand_computed_caption_of_a_known_scene(cap):
    # a round (no wobble, aspect 1), centred, 15% lesion, dark (L* 35) brown on Fitzpatrick II skin (ITA 48)
    img, msk, truth = scene(irregularity=0.0, aspect=1.0, cy=0.5, cx=0.5, target_area=0.15, skin_ita=48.0,
                            ita_difference=80.0, delta_b=8.0, lesion_a=12.0, dx="nv")
    assert truth.fitzpatrick == "II" and 0.10 <= truth.area_ratio < 0.25 and truth.lesion_L < 42
    c = cap.caption(img, msk)
    assert c.text == "An image of <lesion> on <skin>, a medium round dark brown lesion in the centre on light skin"
    assert c.dropped == () and c.n_tokens == count_tokens(cap.tokenizer, c.text)
    assert abs(c.measurements["skin_ita"] - truth.skin_ita) < 1.0
    assert abs(c.measurements["area_ratio"] - truth.area_ratio) < 1e-9


@pytest.mark.parametrize("over, words", [
    ({"target_area": 0.04, "cy": 0.3, "cx": 0.28}, ("a small", "in the upper left")),
    ({"target_area": 0.40}, ("a large",)),
    ({"aspect": 1.5, "irregularity": 0.0}, ("oval",)),
    ({"irregularity": 0.22}, ("irregular",)),
    ({"skin_ita": -5.0}, ("on dark skin",)),
    ({"skin_ita": 62.0}, ("on very light skin",)),
    ({"lesion_a": 36.0, "delta_b": -6.0, "ita_difference": 20.0}, ("pink lesion",)),
])
def test_each_attribute_follows_its_control(cap, over, words):
    base = {"irregularity": 0.0, "aspect": 1.0, "cy": 0.5, "cx": 0.5, "target_area": 0.15, "skin_ita": 48.0, "dx": "nv"}
    img, msk, _ = scene(**{**base, **over})
    text = cap.caption(img, msk).text
    for w in words:
        assert w in text, (w, text)


def test_hair_frame_and_ink_marks(cap):
    base = {"irregularity": 0.0, "aspect": 1.0, "cy": 0.5, "cx": 0.5, "target_area": 0.12, "skin_ita": 50.0}
    s = generate_dermoscopy(6, seed=3, overrides={**CLEAN, **base, "hair_count": np.array([0, 0, 5, 6, 0, 0]),
                                                  "vignette": np.array([0, 0, 0, 0, 0.62, 0.62])})
    got = [cap.caption(i, m).attributes for i, m in zip(s.images, s.masks)]
    assert [a.hair for a in got] == [False, False, True, True, False, False]
    assert ["a dark frame" in a.marks for a in got] == [False, False, False, False, True, True]
    img = s.images[0].copy()
    img[4:12, 4:14] = (120, 40, 160)  # a purple ink mark on the skin
    a = cap.caption(img, s.masks[0]).attributes
    assert "purple ink marks" in a.marks and "purple ink marks" not in got[0].marks


def test_token_limit_drops_lowest_priority_attributes_and_reports_them():
    attrs = DermAttributes("small", "irregular", "dark brown", "in the upper left", "very light", True,
                           ("purple ink marks", "a dark frame"))
    full = compose_prompt(attrs)
    tok = tokenizer()
    n = count_tokens(tok, full)
    text, kept, dropped, k = fit_prompt(attrs, tok, max_tokens=n - 1)
    assert dropped == ("marks",) and "ink" not in text and k <= n - 1 and k == count_tokens(tok, text)
    text, kept, dropped, k = fit_prompt(attrs, tok, max_tokens=count_tokens(tok, compose_prompt(
        DermAttributes(lesion_colour="dark brown", skin_colour="very light"))))
    assert dropped == ("marks", "hair", "position", "shape", "size") and kept.lesion_colour == "dark brown"
    with pytest.raises(PromptTooLongError, match="exceeds"):
        fit_prompt(attrs, tok, max_tokens=8)
    # the mini tokenizer limit (profile max_length) is enforced on the real captioner too
    img, msk, _ = scene(hair_count=6, vignette=0.62)
    short = AttributeCaptioner(tokenizer(18)).caption(img, msk)
    assert short.n_tokens <= 18 and short.dropped and short.n_tokens == count_tokens(tokenizer(18), short.text)


def test_cache_is_per_image_atomic_and_reused(tmp_path, cap):
    s = generate_dermoscopy(3, seed=5)
    cache = CaptionCache(tmp_path)
    first = cap.caption_many(s.images, s.masks, ["a", "b", "c"], cache)
    files = sorted(p.name for p in (tmp_path / cap.fingerprint()).iterdir())
    assert files == ["a.json", "b.json", "c.json"]
    # a cached entry is read back instead of recomputed: tamper with one and see it returned
    p = tmp_path / cap.fingerprint() / "b.json"
    d = json.loads(p.read_text())
    d["text"] = "TAMPERED"
    p.write_text(json.dumps(d))
    again = cap.caption_many(s.images, s.masks, ["a", "b", "c"], cache)
    assert again[0] == first[0] and again[1].text == "TAMPERED"


def test_vlm_path_with_an_injected_generate_function():
    """Prompt construction and parsing (no VLM weights offline): a fake chat function answers."""
    seen = []

    def fake(messages, image):
        seen.append((messages, image))
        text = messages[0]["content"][-1]["text"]
        if "JSON" in text:
            return 'Sure! {"lesion_shape": "oval", "lesion_colour": "light brown", "lesion_size": "small", ' \
                   '"lesion_position": "centre", "skin_colour": "light", "hair": "yes", "marks": "ruler and ink"}'
        assert '"shape": "oval"' in text and "at most 40 words" in text
        return '"A small oval light brown lesion in the centre on light skin with hair, a ruler and ink."\n'

    tok = tokenizer()
    img, msk, _ = scene()
    c = VLMCaptioner(tok, generate_fn=fake, model_name="fake").caption(img, msk)
    assert c.source == "vlm" and c.attributes.hair and c.attributes.marks == ("ruler", "ink")
    assert c.attributes.position == "in the centre"
    assert c.text == ("An image of <lesion> on <skin>, A small oval light brown lesion in the centre on light skin "
                      "with hair, a ruler and ink")
    assert seen[0][1] is not None and seen[0][0][0]["content"][0] == {"type": "image"} and seen[1][1] is None
    # a rephrasing that does not fit falls back to the template, reported
    c2 = VLMCaptioner(tok, generate_fn=fake, max_tokens=22).caption(img, msk)
    assert c2.source == "vlm-template" and c2.n_tokens <= 22 and c2.dropped
    with pytest.raises(FileNotFoundError, match="no VLM at"):
        VLMCaptioner(tok, model_path="/nonexistent/llama")


def test_prompt_sampler_recombines_observed_values_only(cap):
    s = generate_dermoscopy(12, seed=7)
    caps = cap.caption_many(s.images, s.masks)
    sampler = PromptSampler(caps, cap.tokenizer)
    new = sampler.sample(40, seed=1)
    for name in ("size", "shape", "lesion_colour", "position", "skin_colour"):
        assert {getattr(c.attributes, name) for c in new} <= set(sampler.observed(name))
    joint = {c.attributes for c in caps}
    assert all(c.attributes in joint for c in sampler.sample(20, seed=2, mode="joint"))
    assert all("on dark skin" in c.text for c in sampler.sample(5, fix={"skin_colour": "dark"}))
    assert sampler.sample(5, seed=3) == sampler.sample(5, seed=3)


def test_sampler_draws_follow_the_seeded_stream(cap):
    """Marginal mode draws one training caption per attribute, in field order, from ``default_rng(seed)``;
    joint mode one caption per prompt: replayed here by hand, so a reordering of the draws fails."""
    s = generate_dermoscopy(6, seed=9)
    caps = cap.caption_many(s.images, s.masks)
    names = ["size", "shape", "lesion_colour", "position", "skin_colour", "hair", "marks"]
    rng = np.random.default_rng(4)
    expected = [DermAttributes(**{k: getattr(caps[int(rng.integers(6))].attributes, k) for k in names})
                for _ in range(5)]
    drawn = PromptSampler(caps, cap.tokenizer).sample(5, seed=4)
    assert [c.text for c in drawn] == [compose_prompt(a) for a in expected]  # 77 tokens: nothing dropped
    assert {c.source for c in drawn} == {"sampled-marginal"}
    rng = np.random.default_rng(8)
    picks = [caps[int(rng.integers(6))] for _ in range(4)]
    assert [c.text for c in PromptSampler(caps, cap.tokenizer).sample(4, seed=8, mode="joint")] == [p.text for p in picks]
    with pytest.raises(ValueError, match="'marginal' or 'joint'"):
        PromptSampler(caps, cap.tokenizer).sample(1, mode="pairs")


# ------------------------------------------------------------------------------------------ the cache
def test_cache_key_is_the_hash_of_what_determines_the_captions(cap):
    """The fingerprint (the cache folder) is sha256 of the captioner's settings, hand-written here, so that moving
    code around cannot silently orphan the captions already cached."""
    import hashlib

    blob = {"kind": "attributes", "v": 1, "prefix": "An image of <lesion> on <skin>", "max": 77,
            "config": {"size_cuts": [0.10, 0.25], "irregular_below": 0.70, "oval_axis_ratio": 1.35, "centre_band": 0.15,
                       "hair_radius_frac": 1 / 32, "hair_response": 15.0, "hair_fraction": 0.004, "frame_ratio": 0.6,
                       "ink_chroma": 20.0, "ink_hue": [250.0, 335.0], "ink_fraction": 0.003},
            "vocab": len(cap.tokenizer)}
    assert cap.fingerprint() == hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]
    assert AttributeCaptioner(tokenizer(20)).fingerprint() != cap.fingerprint()  # the token limit is part of it


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_cached_captions_get_the_umask_permissions(tmp_path, cap, umask):
    import os

    img, msk, _ = scene()
    old = os.umask(umask)
    try:
        path = CaptionCache(tmp_path).put("fp", "ISIC_1", cap.caption(img, msk))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # mkstemp alone would leave 0600


def test_a_failed_cache_write_leaves_no_file(tmp_path, cap):
    img, msk, _ = scene()
    good = cap.caption(img, msk)
    bad = Caption(good.text, good.attributes, good.n_tokens, measurements={"x": object()})  # not JSON
    cache = CaptionCache(tmp_path)
    with pytest.raises(TypeError):
        cache.put("fp", "ISIC_1", bad)
    assert list((tmp_path / "fp").iterdir()) == [] and cache.get("fp", "ISIC_1") is None


# ------------------------------------------------------------------------------------------ the package
OLD_NAMES = [  # everything the single module dermprompt.py exported before it was split by job
    "PREFIX", "SIZES", "SHAPES", "LESION_COLOURS", "SKIN_COLOURS", "POSITIONS", "MARKS", "DROP_ORDER",
    "PromptTooLongError", "CaptionError", "DermAttributes", "Caption", "CaptionCache", "DermPromptCaptioner",
    "CaptionerConfig", "AttributeCaptioner", "VLMCaptioner", "HFChatVLM", "PromptSampler", "sentence",
    "captioner_from_profile", "compose_prompt", "count_tokens", "fit_prompt", "dermprompt_vocabulary",
    "name_lesion_colour", "skin_colour_name", "position_name", "parse_attribute_answer", "clean_sentence",
    "EXTRACTION_PROMPT", "REPHRASE_PROMPT", "GenerateFn",
]


def test_every_old_name_is_still_importable_from_the_package():
    import importlib

    import ctrlgen.methods.didgen as didgen
    import ctrlgen.methods.didgen.dermprompt as package

    missing = [n for n in OLD_NAMES if not hasattr(package, n)]
    assert missing == [] and set(OLD_NAMES) == set(package.__all__)
    for name in package.__all__:  # each name is defined in exactly one job module, the package only re-exports
        obj = getattr(package, name)
        home = getattr(obj, "__module__", None)
        if home is not None and isinstance(obj, type):
            assert importlib.import_module(home).__dict__[name] is obj
    assert all(getattr(didgen, n) is getattr(package, n) for n in didgen.__all__ if hasattr(package, n))
    assert package.HFChatVLM.__module__ == "ctrlgen.models.vlm"  # the loader is a model, not a method


def _imports(path):
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            yield id(node) in top, names


def test_job_modules_import_at_the_top_and_the_vlm_loader_not_from_methods():
    from pathlib import Path

    import ctrlgen.methods.didgen.dermprompt as package
    import ctrlgen.models.vlm as vlm

    files = sorted(Path(package.__file__).parent.glob("*.py")) + [Path(vlm.__file__)]
    assert len(files) == 10
    local = [(f.name, names) for f in files for at_top, names in _imports(f) if not at_top]
    assert local == []  # no optional heavy dependency here: torch, transformers, skimage and PIL are requirements
    assert not [n for _, names in _imports(Path(vlm.__file__)) for n in names if n.startswith("ctrlgen.methods")]
