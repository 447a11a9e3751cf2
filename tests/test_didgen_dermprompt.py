"""DermPrompt (§4.3.2): measured attributes on procedural scenes with known ground truth, the token
limit with the real tokenizer, the per-image cache, VLM prompt/parse path, recombination."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctrlgen.data.worlds.dermoscopy import generate_dermoscopy
from ctrlgen.methods.didgen.dermprompt import (
    AttributeCaptioner,
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
