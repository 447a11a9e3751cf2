"""Pretraining the mini base models: cache keys, cache hits, resume after an interruption, the CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ctrlgen.config import load_profile
from ctrlgen.data.batches import Batches
from ctrlgen.experiments import base_models as P
from ctrlgen.experiments.base_models.train import _build_tokenizer
from ctrlgen.models import ModelNotFoundError
from ctrlgen.models.cache import key_hash
from ctrlgen.training import region_self_attention_loss

# the smallest run that still exercises every part (smoke architectures, a handful of images and steps)
TINY = {"pretrain.max_train": 6, "pretrain.n_heldout": 2, "pretrain.vae.steps": 2, "pretrain.vae.batch_size": 2,
        "pretrain.unet.steps": 4, "pretrain.unet.plain_steps": 4, "pretrain.unet.batch_size": 2,
        "pretrain.unet.checkpoint_every": 2, "pretrain.measure.n_samples": 2, "pretrain.measure.sample_steps": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**extra):
    return load_profile("smoke", {**TINY, **extra})


def test_key_changes_with_training_values_and_data_only():
    cfg = _cfg()
    fp = "data-a"
    base = key_hash(P.unet_key_parts(cfg, fp, "selfattn"))
    assert base == key_hash(P.unet_key_parts(_cfg(), fp, "selfattn"))  # deterministic
    # values that do not affect training leave the key alone
    assert base == key_hash(P.unet_key_parts(_cfg(**{"ch02.toy.train_steps": 7}), fp, "selfattn"))
    assert base == key_hash(P.unet_key_parts(_cfg(**{"pretrain.measure.n_samples": 3}), fp, "selfattn"))
    # the plain variant's own step count does not touch the selfattn key, and vice versa
    assert base == key_hash(P.unet_key_parts(_cfg(**{"pretrain.unet.plain_steps": 9}), fp, "selfattn"))
    for change in ({"pretrain.unet.lr": 1e-3}, {"pretrain.unet.steps": 5}, {"models.mini.unet.attention_heads": 2},
                   {"pretrain.self_attention_loss.weight": 0.1}, {"pretrain.vae.steps": 3}, {"seed": 1}):
        assert base != key_hash(P.unet_key_parts(_cfg(**change), fp, "selfattn")), change
    assert base != key_hash(P.unet_key_parts(cfg, "data-b", "selfattn"))
    assert base != key_hash(P.unet_key_parts(cfg, fp, "plain"))
    # the plain key ignores the auxiliary loss settings
    plain = key_hash(P.unet_key_parts(cfg, fp, "plain"))
    assert plain == key_hash(P.unet_key_parts(_cfg(**{"pretrain.self_attention_loss.weight": 0.1}), fp, "plain"))
    assert len(P.code_version()) == 12


def test_data_fingerprint_follows_the_records(isolated_cache):
    a = P.load_domain_data(_cfg(), "derm")
    b = P.load_domain_data(_cfg(), "derm")
    c = P.load_domain_data(_cfg(**{"pretrain.max_train": 5}), "derm")
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert all(cap.startswith("an image of a ") and cap.endswith("<lesion> on <skin>") for cap in a.captions)
    assert a.images.shape[1:] == (32, 32, 3) and a.regions.shape == a.images.shape[:3]


def test_second_call_loads_from_cache_and_resume_continues(isolated_cache, monkeypatch):
    cfg = _cfg()
    data = P.load_domain_data(cfg, "derm")
    # interrupted after 2 of 4 steps: a checkpoint is left, no model is published
    part = P.pretrain_domain(cfg, "derm", False, progress=False, stop_after=2, data=data)
    assert part.steps == 2 and not part.metrics and not (part.folder / "unet").exists()
    done = P.pretrain_domain(cfg, "derm", False, progress=False, data=data)
    assert done.resumed_from == 2 and [h["step"] for h in done.history] == [1, 2, 3, 4]
    assert (done.folder / "unet").is_dir() and (done.folder / "pretrain.json").is_file()
    assert done.metrics["vae_psnr_heldout_db"] > 0 and "affinity (layer-mean map)" in done.metrics

    # an uninterrupted run gives the same losses
    again = P.pretrain_domain(cfg, "derm", False, progress=False, data=data, force=True, force_vae=False)
    assert [round(h["loss"], 5) for h in again.history] == [round(h["loss"], 5) for h in done.history]

    # a second call with the same key trains nothing
    def boom(*a, **k):
        raise AssertionError("trained although cached")

    monkeypatch.setattr("ctrlgen.experiments.base_models.train.train_diffusion", boom)
    monkeypatch.setattr("ctrlgen.experiments.base_models.train.train_vae", boom)
    cached = P.pretrain_domain(cfg, "derm", False, progress=False, data=data)
    assert cached.cached and cached.history == again.history
    loaded = P.load_variant(cfg, "derm", "plain")
    assert "<lesion>" in loaded.tokenizer.get_vocab() and loaded.scaling_factor == pytest.approx(
        done.metrics["scaling_factor"])


def test_region_loss_matches_the_two_region_loss():
    from ctrlgen.training.losses import self_attention_structure_loss

    torch.manual_seed(0)
    sa = torch.softmax(torch.randn(2, 16, 16) * 3, -1)
    mask = (torch.rand(2, 4, 4) > 0.5).float()
    regions = torch.stack([1 - mask, mask], 1)
    ours = region_self_attention_loss({4: sa}, regions)
    theirs = self_attention_structure_loss({4: sa}, mask)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_every_domain_has_both_variants_and_cxr_has_regions(isolated_cache):
    cfg = _cfg()
    assert P.available_variants(cfg, "cxr") == ("selfattn", "plain") and P.default_variant(cfg, "cxr") == "selfattn"
    assert P.variant_dir(cfg, "cxr", "selfattn").name == "cxr" and P.variant_dir(cfg, "cxr", "plain").name == "cxr-plain"
    assert P.variant_dir(cfg, "derm", "selfattn").name == "derm" and P.variant_dir(cfg, "derm", "plain").name == "derm-plain"
    assert P.cxr_caption({"Cardiomegaly": 1.0, "Effusion": 1.0, "Mass": 0.0}) == "a chest x-ray with cardiomegaly and effusion"
    assert P.cxr_caption({"No Finding": 1.0}) == "a chest x-ray with no finding"
    data = P.load_domain_data(cfg, "cxr")
    assert data.has_regions and data.regions.shape == data.images.shape[:3] and "regions:" in data.notes
    assert set(np.unique(data.regions)) <= {0, 1, 2} and (data.regions == 1).mean() > 0.03


def test_cli_help_works_without_torch():
    code = ("import sys; from ctrlgen.cli.main import main\n"
            "try:\n    main(['pretrain', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--no-self-attention-loss" in out.stdout and "{derm,scenes,cxr}" in out.stdout


def test_cli_pretrain_end_to_end(isolated_cache, capsys):
    from ctrlgen.cli.main import main

    args = ["pretrain", "derm", "--profile", "smoke", "--quiet", "--no-self-attention-loss", "-p", "seed=1"]
    for k, v in TINY.items():
        args += ["-p", f"{k}={v}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "isic2018_task1" in out and "derm/plain" in out and "trained" in out
    assert main(args) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["pretrain", "cxr", "--profile", "smoke", "--self-attention-loss", "-p", "pretrain.variants=[plain]"]) == 2


def test_vae_resumes_exactly_where_it_stopped(tmp_path):
    """An interrupted VAE run (2 of 4 steps, checkpointed) continued to 4 equals an uninterrupted 4-step run."""
    from ctrlgen.models import build_caption_tokenizer, build_mini_components
    from ctrlgen.training import VAETrainConfig, train_vae

    cfg = _cfg()
    tok = build_caption_tokenizer(["a b"], 64, 1, model_max_length=8)
    x = torch.rand(8, 3, 32, 32) * 2 - 1

    def run(steps, folder):
        vae = build_mini_components(cfg, tok, seed=0).vae
        res = train_vae(vae, Batches({"pixel_values": x}, 2, 0, augment=True),
                        VAETrainConfig(steps=steps, seed=0, progress=False, output_dir=str(folder), checkpoint_every=1))
        return vae, res

    run(2, tmp_path / "a")
    resumed_vae, resumed = run(4, tmp_path / "a")
    whole_vae, whole = run(4, tmp_path / "b")
    assert resumed.resumed_from == 2 and whole.resumed_from == 0
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], rel=1e-5)
    for (n, a), b in zip(resumed_vae.state_dict().items(), whole_vae.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_derm_tokenizer_has_every_dermprompt_word_as_one_token(isolated_cache):
    from ctrlgen.methods.didgen import dermprompt_vocabulary

    data = P.load_domain_data(_cfg(), "derm")
    tok = _build_tokenizer(_cfg(), data)
    import re

    # CLIP's pre-tokenizer splits "blue-grey" into blue / - / grey: every letter run must be one token
    words = {w for phrase in dermprompt_vocabulary() for w in re.findall(r"<\w+>|[a-z]+", phrase.lower())}
    assert len(words) > 20 and "<lesion>" in words
    for w in words:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w


def test_cxr_tokenizer_has_every_label_prompt_word_as_one_token(isolated_cache):
    """Chapter 6's label prompts ("… without pleural effusion, and unclear about …") fit the mini text encoder:
    every word is one token of the cxr base model's tokenizer."""
    import re

    from ctrlgen.methods.cxr_irgen.prompts import label_prompt, prompt_vocabulary

    data = P.load_domain_data(_cfg(), "cxr")
    tok = _build_tokenizer(_cfg(), data)
    words = {w for text in prompt_vocabulary() for w in re.findall(r"[a-z]+", text.lower())}
    assert {"unclear", "cardiomediastinum", "pleural", "without"} <= words
    for w in words:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    prompt = label_prompt({"Enlarged Cardiomediastinum": 1.0, "Pleural Effusion": 0.0, "Lung Opacity": -1.0})
    pieces = re.findall(r"[a-z]+|[^\sa-z]", prompt.lower())  # CLIP's pre-tokenizer: letter runs, each punctuation mark
    assert len(tok(prompt)["input_ids"]) == len(pieces) + 2 <= 32  # one token each + start, end; fits mini's 32


def test_checkpoint_frequency_is_not_part_of_the_key():
    fp = "data-a"
    for part in ("pretrain.vae.checkpoint_every", "pretrain.unet.checkpoint_every"):
        assert key_hash(P.unet_key_parts(_cfg(), fp, "selfattn")) == key_hash(P.unet_key_parts(_cfg(**{part: 7}), fp, "selfattn"))


def test_quality_bar_rows_and_cache(isolated_cache, monkeypatch):
    """The bar of a (tiny) derm model: every criterion present, labelled pass/fail/undefined with thresholds
    from the profile; a second call reads the cache (measuring again would raise here)."""
    from ctrlgen.experiments.base_models import bar

    cfg = _cfg(**{"pretrain.quality_bar.classifier_steps": 3, "pretrain.quality_bar.classifier_batch": 4,
                  "pretrain.quality_bar.n_samples": 4, "pretrain.quality_bar.sample_steps": 2})
    res = P.pretrain_domain(cfg, "derm", True, progress=False)
    data = P.load_domain_data(cfg, "derm")
    model = P.load_variant(cfg, "derm", "selfattn")
    table = bar.model_bar(cfg, model, res.key, data, "selfattn")
    assert set(table["criterion"]) == {"distance", "prompt fidelity", "VAE round trip", "self-attention affinity"}
    assert set(table.loc[table["criterion"] == "distance", "quantity"]) == {"SW1", "FID (VAE features)"}
    assert set(table.loc[table["criterion"] == "prompt fidelity", "quantity"]) == {"size", "contrast"}
    assert set(table["status"]) <= {"pass", "fail", "undefined"}
    affinity = table[table["criterion"] == "self-attention affinity"].iloc[0]
    assert affinity["threshold"] == cfg.pretrain.quality_bar.min_affinity
    assert (affinity["status"] == "pass") == (affinity["value"] >= affinity["threshold"])

    monkeypatch.setattr(bar, "measure_bar", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-measured")))
    again = bar.model_bar(cfg, model, res.key, data, "selfattn")
    assert again.equals(table)


def test_snapshot_steps_split_the_run_evenly():
    assert P.snapshot_steps(_cfg(**{"pretrain.unet.steps": 6, "pretrain.unet.curve_points": 3}), "selfattn") == [2, 4]
    assert P.snapshot_steps(_cfg(**{"pretrain.unet.steps": 6, "pretrain.unet.curve_points": 1}), "selfattn") == []
    assert P.snapshot_steps(_cfg(**{"pretrain.unet.steps": 2, "pretrain.unet.curve_points": 4}), "selfattn") == [1]
    assert P.snapshot_steps(_cfg(**{"pretrain.unet.curve_points": 3}), "plain") == []  # the default variant only


def test_snapshots_survive_a_resume_and_load_as_earlier_models(isolated_cache):
    cfg = _cfg(**{"pretrain.unet.steps": 6, "pretrain.unet.curve_points": 3, "pretrain.unet.checkpoint_every": 3})
    data = P.load_domain_data(cfg, "derm")
    part = P.pretrain_domain(cfg, "derm", True, progress=False, stop_after=3, data=data)  # snapshot 2 written
    assert part.steps == 3 and not part.snapshots
    done = P.pretrain_domain(cfg, "derm", True, progress=False, data=data)
    assert [s["step"] for s in done.snapshots] == [2, 4]
    assert done.snapshots[0]["train_seconds"] < done.snapshots[1]["train_seconds"] <= done.curve_seconds
    final = P.load_variant(cfg, "derm")
    early = P.load_snapshot(cfg, "derm", 2)
    w_final = dict(final.unet.named_parameters())
    assert any(not torch.equal(p, w_final[n]) for n, p in early.unet.named_parameters())
    assert torch.equal(early.vae.encoder.layers[0].weight, final.vae.encoder.layers[0].weight)  # one VAE
    with pytest.raises(ModelNotFoundError, match="step 3"):
        P.load_snapshot(cfg, "derm", 3)


def test_held_out_and_training_cuts_are_seeded_samples_not_the_first_records():
    """NIH's val/test images come label-sorted in reader order (the first 100 all abnormal): a first-n cut held out
    no normal image. The cut is a seeded sample in reader order, the same for the same seed."""
    from types import SimpleNamespace

    from ctrlgen.data.domains import _split

    records = ([SimpleNamespace(id=f"a{i}", split="test", label="abnormal") for i in range(50)]
               + [SimpleNamespace(id=f"n{i}", split="test", label="normal") for i in range(50)]
               + [SimpleNamespace(id=f"t{i}", split="train", label="abnormal" if i < 30 else "normal") for i in range(60)])
    shares = []
    for seed in range(40):
        train, held = _split(records, n_heldout=20, max_train=30, seed=seed)
        assert len(held) == 20 and len(train) == 30
        assert {r.split for r in held} == {"test"} and {r.split for r in train} == {"train"}
        assert [records.index(r) for r in held] == sorted(records.index(r) for r in held)   # reader order kept
        shares.append(np.mean([r.label == "normal" for r in held]))
        assert _split(records, 20, 30, seed) == (train, held)
    assert 0.35 < np.mean(shares) < 0.65 and min(shares) > 0   # a first-20 cut: 0 every time
    train, held = _split(records, n_heldout=0, max_train=0, seed=0)   # 0 = all, in reader order
    assert held == records[:100] and train == records[100:]
