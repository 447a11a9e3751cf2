"""Stage B of the scenes base models (``base_models.word_alignment``): caption grammar, recomposition, batches, resume."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ctrlgen.analysis.attribute_labels import scene_objects
from ctrlgen.config import load_profile
from ctrlgen.data.worlds.multiconcept import Concept
from ctrlgen.experiments.base_models import word_alignment as W
from ctrlgen.experiments.base_models.keys import CODE_FILES, DOMAIN_CODE_FILES
from ctrlgen.models import build_caption_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["a photo of a green striped circle and a orange diamond on a plain background",
            "a photo of a red square and a blue striped ring and a white cross on a field background"]


def test_scene_objects_reads_every_object_in_order_and_names_a_bad_caption():
    """Stage B reads the captions with the attribute labeler's parser (``analysis.attribute_labels``), in order."""
    objects, background = scene_objects(CAPTIONS[1])
    assert objects == [Concept("square", "red", "plain"), Concept("ring", "blue", "striped"),
                       Concept("cross", "white", "plain")]
    assert background == "field"
    for bad in ("a photo of a circle on a plain background",          # no colour (a bare caption)
                "a photo of a teal circle on a plain background",      # colour outside the world
                "a photo of a red dotted circle on a plain background",  # texture outside the world
                "a photo of a red circle"):                            # no background phrase
        with pytest.raises(ValueError, match="scenes caption"):
            scene_objects(bad)


def test_recompose_writes_a_complete_or_a_bare_caption():
    objects, background = scene_objects(CAPTIONS[1])
    words, regions = W.recompose(objects, background, np.random.default_rng(0), bare=False)
    named = {w: r for w, r in zip(words, regions) if r >= 0}
    assert named == {"red": 1, "square": 1, "blue": 2, "striped": 2, "ring": 2, "white": 3, "cross": 3,
                     "field": 0, "background": 0}
    assert words[:3] == ["a", "photo", "of"] and words[-4:] == ["on", "a", "field", "background"]
    assert words.count("a") == 1 + 3 + 1  # "a photo", one article per object, "on a"
    assert len(words) == len(regions) == 3 + 3 * 2 + 4 + 2 + 4  # prefix, articles+shapes, 4 attributes, "and"s, bg
    bare_words, bare_regions = W.recompose(objects, background, np.random.default_rng(0), bare=True)
    # chapter 3's grammar: "a photo of <shape> and <shape> and <shape>", each shape aligned with its object
    assert bare_words[:3] == ["a", "photo", "of"] and bare_words[4::2] == ["and", "and"]
    assert {w: r for w, r in zip(bare_words, bare_regions) if r >= 0} == {"square": 1, "ring": 2, "cross": 3}
    assert [r for r in bare_regions if r < 0] == [-1] * 5
    # the same draw orders both alike; over draws the first-named object varies
    assert [w for w in words if w in ("square", "ring", "cross")] == bare_words[3::2]
    firsts = {W.recompose(objects, background, np.random.default_rng(s), False)[0][4] for s in range(20)}
    assert firsts == {"red", "blue", "white"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_caption_tokenizer(CAPTIONS * 5, 1000, 1, model_max_length=32)


def test_word_positions_point_at_each_word_in_the_tokenized_caption(tokenizer):
    words = "a photo of blue ring and red square".split()
    regions = [-1, -1, -1, 1, 1, -1, 2, 2]
    ids, positions = W.word_positions(tokenizer, words, regions)
    assert ids == tokenizer(" ".join(words)).input_ids  # the same ids as the whole caption tokenized
    assert [tokenizer.convert_ids_to_tokens(ids[p]) for p in positions] == [f"{w}</w>" for w in words]
    # an unaligned word may be several tokens (the positions after it count them); an aligned one may not
    ids, positions = W.word_positions(tokenizer, ["teal", "ring"], [-1, 1])
    assert positions == [1, len(ids) - 2] and len(ids) > 4
    with pytest.raises(ValueError, match="'teal'"):
        W.word_positions(tokenizer, ["teal"], [1])


def _settings(**change):
    values = dict(steps=2, batch_size=2, lr=1e-4, warmup_steps=0, alpha=0.1, bare_probability=0.0,
                  bare_reconstruction=False, prompt_dropout=0.0, ema_decay=0.0, checkpoint_every=1)
    return W.WordAlignmentSettings(**{**values, **change})


def _labels() -> np.ndarray:
    """Two 8x8 label maps: caption 0's circle on the left half, diamond top right; caption 1's three objects in rows."""
    labels = np.zeros((2, 8, 8), np.int64)
    labels[0, :, :4], labels[0, :4, 4:] = 1, 2
    labels[1, 0:2], labels[1, 3:5], labels[1, 6:8] = 1, 2, 3
    return labels


def test_alignment_batches_give_each_word_its_objects_mask(tokenizer):
    latents = torch.randn(2, 4, 8, 8)
    stream = W.AlignmentBatches(latents, CAPTIONS, _labels(), tokenizer, _settings(), seed=3)
    batch = next(iter(stream))
    again = next(iter(stream))  # re-iterating starts again: the same first batch
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    labels = torch.from_numpy(_labels())
    for row in range(2):
        i = int(next(j for j in range(2) if torch.equal(batch["latents"][row], latents[j])))
        ids = batch["input_ids"][row].tolist()
        objects, background = scene_objects(CAPTIONS[i])
        expected = {o.shape: k + 1 for k, o in enumerate(objects)} | {o.colour: k + 1 for k, o in enumerate(objects)}
        expected |= {background: 0, "background": 0,
                     "striped": next((k + 1 for k, o in enumerate(objects) if o.texture == "striped"), -1)}
        valid = batch["token_valid"][row]
        n_named = sum(2 + (o.texture == "striped") for o in objects) + 2  # colour, [texture,] shape; kind + "background"
        assert int(valid.sum()) == n_named
        for j in torch.nonzero(valid).flatten().tolist():
            word = tokenizer.convert_ids_to_tokens(ids[int(batch["token_indices"][row, j])])[:-4]
            assert torch.equal(batch["token_masks"][row, j], (labels[i] == expected[word]).float()), word


def test_a_bare_caption_aligns_its_shape_words_and_enters_l_attn_only(tokenizer):
    """Bare captions (shape words only) get L_rec weight 0 unless ``bare_reconstruction``; complete ones 1."""
    latents = torch.randn(2, 4, 8, 8)
    bare = next(iter(W.AlignmentBatches(latents, CAPTIONS, _labels(), tokenizer, _settings(bare_probability=1.0), 3)))
    assert bare["rec_weight"].tolist() == [0.0, 0.0]
    for row in range(2):
        shapes = [tokenizer.convert_ids_to_tokens(int(bare["input_ids"][row, int(p)]))[:-4]
                  for p in bare["token_indices"][row][bare["token_valid"][row]]]
        assert set(shapes) <= {"circle", "diamond", "square", "ring", "cross"} and len(shapes) in (2, 3)
    kept = W.AlignmentBatches(latents, CAPTIONS, _labels(), tokenizer,
                              _settings(bare_probability=1.0, bare_reconstruction=True), 3)
    assert next(iter(kept))["rec_weight"].tolist() == [1.0, 1.0]
    complete = next(iter(W.AlignmentBatches(latents, CAPTIONS, _labels(), tokenizer, _settings(), 3)))
    assert complete["rec_weight"].tolist() == [1.0, 1.0]
    # a mixed stream: over many batches the bare share is near bare_probability
    mixed = W.AlignmentBatches(latents, CAPTIONS, _labels(), tokenizer, _settings(bare_probability=0.7), 3)
    shares = [float((b["rec_weight"] == 0).float().mean()) for b, _ in zip(mixed, range(300))]
    assert abs(np.mean(shares) - 0.7) < 0.06


def test_a_dropped_prompt_has_no_aligned_word(tokenizer):
    stream = W.AlignmentBatches(torch.randn(2, 4, 8, 8), CAPTIONS, _labels(), tokenizer, _settings(prompt_dropout=1.0), 0)
    batch = next(iter(stream))
    assert not batch["token_valid"].any()
    assert batch["rec_weight"].tolist() == [1.0, 1.0]  # an unconditional sample keeps its L_rec (guidance needs it)
    bare = W.AlignmentBatches(torch.randn(2, 4, 8, 8), CAPTIONS, _labels(), tokenizer,
                              _settings(prompt_dropout=1.0, bare_probability=1.0), 0)
    assert next(iter(bare))["rec_weight"].tolist() == [1.0, 1.0]
    assert (batch["input_ids"][:, :2] == torch.tensor([tokenizer.bos_token_id, tokenizer.eos_token_id])).all()


def test_stage_b_is_outside_the_base_models_code_keys():
    """A change to stage B must retrain the scenes stage-B models only, never a derm or cxr base model."""
    assert "experiments/base_models/word_alignment.py" not in CODE_FILES + sum(DOMAIN_CODE_FILES.values(), ())
    assert "experiments/base_models/word_alignment.py" in W.CODE_FILES


TINY = {"pretrain.max_train": 6, "pretrain.n_heldout": 2, "pretrain.vae.steps": 2, "pretrain.vae.batch_size": 2,
        "pretrain.unet.steps": 2, "pretrain.unet.plain_steps": 2, "pretrain.unet.batch_size": 2,
        "pretrain.unet.checkpoint_every": 2, "pretrain.measure.n_samples": 2, "pretrain.measure.sample_steps": 2,
        "pretrain.word_alignment.steps": 4, "pretrain.word_alignment.batch_size": 2,
        "pretrain.word_alignment.checkpoint_every": 2}


def test_align_words_resumes_where_it_stopped_and_loads_from_the_cache(isolated_cache, monkeypatch):
    cfg = load_profile("smoke", TINY)
    part = W.align_words(cfg, "plain", progress=False, stop_after=2)
    assert part["finished"] is False and [h["step"] for h in part["history"]] == [1, 2]
    assert not (W.aligned_dir(cfg, "plain") / "unet").exists()
    done = W.align_words(cfg, "plain", progress=False)
    assert done["finished"] and done["resumed_from"] == 2 and [h["step"] for h in done["history"]] == [1, 2, 3, 4]
    assert {"rec", "attn"} <= set(done["history"][0])
    resumed = W.load_aligned(cfg, "plain")
    shutil.rmtree(W.aligned_dir(cfg, "plain"))  # an uninterrupted run gives the same losses and weights
    again = W.align_words(cfg, "plain", progress=False)
    assert [round(h["loss"], 5) for h in again["history"]] == [round(h["loss"], 5) for h in done["history"]]
    fresh = W.load_aligned(cfg, "plain")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(resumed.unet.parameters(), fresh.unet.parameters()))
    monkeypatch.setattr(W, "train_diffusion", lambda *a, **k: pytest.fail("trained although cached"))
    assert W.align_words(cfg, "plain", progress=False)["key"] == again["key"] == W.aligned_key(cfg, "plain")
    # the stage-A model is left as it was: stage B writes beside it
    assert W.aligned_dir(cfg, "plain").name == "scenes-plain-words"


def test_cli_pretrain_scenes_also_aligns_the_words(isolated_cache, capsys):
    from ctrlgen.cli.main import main

    args = ["pretrain", "scenes", "--profile", "smoke", "--quiet", "--no-self-attention-loss"]
    for k, v in TINY.items():
        args += ["-p", f"{k}={v}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "scenes/plain + words (stage B" in out and "4 steps" in out
    assert (W.aligned_dir(load_profile("smoke", TINY), "plain") / W.RECORD).is_file()
