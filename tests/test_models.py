"""Models: published SD configs (parameter counts are facts), mini models, tokenizer, placeholder tokens, registry, CLI."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ctrlgen.config import load_profile
from ctrlgen.data.domains import DomainData
from ctrlgen.data.worlds.multiconcept import BACKGROUNDS, novel_pairs, pretrain_concepts, scene_caption
from ctrlgen.experiments.base_models import extra_vocabulary, tokenizer_corpus
from ctrlgen.models import (
    ModelNotFoundError,
    add_placeholder_tokens,
    build_caption_tokenizer,
    build_mini_components,
    check_models,
    count_parameters,
    encode_latents,
    load_base_model,
    load_components,
    load_tokenizer,
    load_vae,
    models_root,
    published_config,
    save_tokenizer,
    token_positions,
)
from ctrlgen.metrics.image import VAEEncoderFeatures
from ctrlgen.models.mini import mini_vae
from ctrlgen.models.registry import local_folder

# Published parameter counts of the checkpoints (diffusers/transformers builds of the real weights).
COUNTS = {"sd21_base": (865_910_724, 83_653_863, 340_387_840), "sd14": (859_520_964, 83_653_863, 123_060_480)}


@pytest.mark.parametrize("arch", sorted(COUNTS))
def test_published_configs_have_the_published_sizes(arch):
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(published_config(arch, "unet"))
        vae = AutoencoderKL.from_config(published_config(arch, "vae"))
        te_cfg = {k: v for k, v in published_config(arch, "text_encoder").items() if k not in ("architectures", "torch_dtype")}
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    assert (count_parameters(unet), count_parameters(vae), count_parameters(te)) == COUNTS[arch]
    assert unet.config.sample_size == 64 and 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert published_config(arch, "scheduler")["beta_schedule"] == "scaled_linear"


def test_mini_models_match_the_feasibility_notes():
    cfg = load_profile("mini")
    tok = build_caption_tokenizer(["an image of a small dark lesion on skin"])
    model = build_mini_components(cfg, tok)
    # NOTES-mini-feasibility.md: U-Net 4.19 M parameters, f = 4, 16x16x4 latent. The VAE is an AutoencoderTiny
    # (issue 12) with 64 channels at 3 levels, 2 blocks per inner level; by hand (3x3 convs: 9·in·out + bias,
    # a TAESD block = 3 convs 64->64 = 110,784): encoder 1,792 + 110,784 + 36,864 + 2·110,784 + 36,864
    # + 2·110,784 + 2,308 = 631,748; decoder 2,368 + 2·110,784 + 36,864 + 2·110,784 + 36,864 + 110,784 + 1,731
    # = 631,747
    assert isinstance(model.vae, AutoencoderTiny) and count_parameters(model.vae) == 631_748 + 631_747
    assert round(count_parameters(model.unet) / 1e6, 2) == 4.19
    assert model.vae_scale_factor == 4 and model.latent_size(64) == 16
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size == 64
    with torch.no_grad():
        z = model.encode_images(torch.zeros(1, 3, 64, 64))
        x = model.decode_latents(z)
        emb = model.encode_prompt(["an image of a lesion"])
        eps = model.unet(z, 10, emb).sample
    assert z.shape == (1, 4, 16, 16) and x.shape == (1, 3, 64, 64) and eps.shape == z.shape
    assert emb.shape == (1, 32, 64)


def test_tokenizer_words_are_single_tokens_and_round_trip(tmp_path):
    corpus = ["an image of a small dark lesion on skin", "a large faint lesion, with hair", "a cat and a dog"]
    tok = build_caption_tokenizer(corpus, extra_words=["melanoma"])
    for word in ["image", "lesion", "skin", "faint", "hair", "dog", "melanoma", ","]:
        assert len(tok.tokenize(word)) == 1, word
    assert len(tok.tokenize("zebra")) > 1  # unseen words fall back to pieces
    ids = tok("an image of a cat")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    again = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))
    assert again("a large faint lesion")["input_ids"] == tok("a large faint lesion")["input_ids"]


def test_placeholder_tokens_initialised_from_words():
    cfg = load_profile("smoke")
    tok = build_caption_tokenizer(["an image of a lesion on skin"])
    model = build_mini_components(cfg, tok)
    n0 = len(tok)
    pt = add_placeholder_tokens(tok, model.text_encoder, ["<lesion>", "<skin>"], ["lesion", "skin"])
    emb = model.text_encoder.get_input_embeddings().weight
    assert len(tok) == n0 + 2 and emb.shape[0] == n0 + 2
    for token, word in zip(pt.tokens, pt.init_words):
        assert torch.equal(emb[pt.id_of(token)], emb[tok.convert_tokens_to_ids(word + "</w>")])
    assert tok.tokenize("an image of <lesion> on <skin>") == ["an</w>", "image</w>", "of</w>", "<lesion>", "on</w>", "<skin>"]
    assert token_positions(tok, "an image of <lesion> on <skin>", "<lesion>") == [4]


def test_save_and_load_components(tmp_path):
    cfg = load_profile("smoke")
    model = build_mini_components(cfg, build_caption_tokenizer(["an image of a lesion"]))
    model.save(tmp_path / "m")
    again = load_components(tmp_path / "m")
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        emb = model.encode_prompt("an image")
        assert torch.allclose(again.encode_prompt("an image"), emb)
        assert torch.allclose(again.unet(z, 5, emb).sample, model.unet(z, 5, emb).sample)
    assert again.scheduler_config["beta_schedule"] == "scaled_linear"


def test_registry_offline_messages(tmp_path):
    full = load_profile("full", {"models.root": str(tmp_path)})
    assert models_root(full) == tmp_path
    assert local_folder(full, "stabilityai/stable-diffusion-2-1-base") == tmp_path / "stabilityai--stable-diffusion-2-1-base"
    status = {s.key: s for s in check_models(full)}
    assert not status["models.pretrained.sd21"].present
    with pytest.raises(ModelNotFoundError, match="ctrlgen models fetch"):
        load_base_model(full, "derm")
    mini = load_profile("mini")
    assert models_root(mini).name == "models"
    with pytest.raises(ModelNotFoundError, match="ctrlgen pretrain derm"):
        load_base_model(mini, "derm")


def test_cli_check_and_fetch(tmp_path, capsys):
    from ctrlgen.cli.common import EXIT_FAILED, EXIT_USAGE
    from ctrlgen.cli.models import add_models_parser

    parser = argparse.ArgumentParser()
    add_models_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "check", "--profile", "full", "-p", f"models.root={tmp_path}"])
    assert args.func(args) == EXIT_FAILED
    lines = capsys.readouterr().out.splitlines()
    named = ["models.pretrained.sd21", "models.pretrained.sd14", "didgen.dermprompt.vlm_model",
             "didgen.metrics.inception_weights", "didgen.metrics.alexnet_weights", "models.weights.clip",
             "models.weights.dino", "models.weights.bart", "models.weights.xrv_densenet",
             "models.weights.imagenet.vgg16", "models.weights.imagenet.resnet18", "models.weights.imagenet.densenet121",
             "models.weights.imagenet.vit_b_16"]
    status = {line.split()[0]: line for line in lines if line and not line.startswith(" ")}
    for key in named:
        assert "MISSING" in status[key], key
    assert str(tmp_path / "facebook--dinov2-base") in status["models.weights.dino"]
    assert any("expected: §4.3.2 DermPrompt VLM" in line for line in lines)
    assert any("torch-fidelity" in line for line in lines) and lines[-1].endswith(f"{len(status) - 1} MISSING")
    # present weights say ok: a DINOv2 folder with config and weights, an ImageNet state-dict file
    (tmp_path / "facebook--dinov2-base").mkdir()
    (tmp_path / "facebook--dinov2-base" / "config.json").write_text("{}")
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "vgg16-397923af.pth").write_bytes(b"x")
    (tmp_path / "facebook--bart-base").mkdir()
    (tmp_path / "facebook--bart-base" / "config.json").write_text("{}")
    assert args.func(args) == EXIT_FAILED
    status = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and not line.startswith(" ")}
    assert "MISSING weights" in status["models.weights.dino"]
    (tmp_path / "facebook--dinov2-base" / "model.safetensors").write_bytes(b"x")
    assert args.func(args) == EXIT_FAILED
    status = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and not line.startswith(" ")}
    assert status["models.weights.dino"].split()[1] == "ok" and status["models.weights.imagenet.vgg16"].split()[1] == "ok"
    assert "tokenizer files" in status["models.weights.bart"]
    args = parser.parse_args(["models", "fetch", "--profile", "full", "-p", f"models.root={tmp_path}"])
    assert args.func(args) == EXIT_FAILED  # HF_HUB_OFFLINE=1 in tests: refuses, no network
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    args = parser.parse_args(["models", "fetch", "--profile", "mini"])
    assert args.func(args) == EXIT_USAGE


def test_registry_lists_every_weight_the_chapters_read_at_full_scale(tmp_path):
    """Pix2PixHD's VGG19 (a file under the models root), chapter 6's CLIP image tower, U-ViT and BART: the full
    profile names bart-base (the thesis's) and leaves the other two empty, which the check lists as "not set" with
    what runs instead; the mini profile, which needs none of them, does not list them."""
    full = load_profile("full", {"models.root": str(tmp_path)})
    status = {s.key: s for s in check_models(full)}
    vgg = status["gan_baselines.pix2pixhd.vgg_weights"]
    assert vgg.folder == tmp_path / "imagenet" / "vgg19-dcbb9e9d.pth" and vgg.missing == ("the file",)
    assert "Pix2PixHD" in vgg.expect
    for key, instead in (("ch06.vision.clip_image_encoder", "stops"), ("ch06.vision.uvit.weights", "from scratch")):
        assert status[key].missing == ("not set",) and instead in status[key].expect, key
    bart = status["ch06.language.bart"]
    assert bart.folder == tmp_path / "facebook--bart-base" and bart.missing == ("the whole folder",)
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "vgg19-dcbb9e9d.pth").write_bytes(b"x")
    clip = tmp_path / "clip-vision"
    clip.mkdir()
    (clip / "config.json").write_text("{}")
    (clip / "model.safetensors").write_bytes(b"x")
    full = load_profile("full", {"models.root": str(tmp_path), "ch06.vision.clip_image_encoder": str(clip)})
    status = {s.key: s for s in check_models(full)}
    assert status["gan_baselines.pix2pixhd.vgg_weights"].present
    assert status["ch06.vision.clip_image_encoder"].present  # an image tower needs no tokenizer files
    mini_keys = {s.key for s in check_models(load_profile("mini"))}
    assert not mini_keys & {"ch06.vision.clip_image_encoder", "ch06.vision.uvit.weights", "ch06.language.bart"}


def test_caption_tokenizer_files_are_byte_identical_in_every_process(tmp_path):
    """Two fresh processes (any hash seed) write the same tokenizer files: tied pair counts are broken by
    order, not by a hash map (the old BpeTrainer gave different vocabularies, so fresh caches differed)."""
    import hashlib
    import os
    import subprocess
    import sys

    corpus = ["a red cross and an orange checkered square", "a blue circle and a green square"] * 3 + \
        ["two red crosses", "a lesion on light skin", "an image of a dark lesion"]
    digests = set()
    for seed in (1, 2, 3):
        out = tmp_path / f"tok{seed}"
        code = (f"from ctrlgen.models import build_caption_tokenizer as b, save_tokenizer as s; "
                f"s(b({corpus!r}, extra_words=['melanoma']), {str(out)!r})")
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)})
        digests.add(tuple(hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())))
    assert len(digests) == 1
    tok = load_tokenizer(tmp_path / "tok1")
    assert tok.tokenize("checkered melanoma") == ["checkered</w>", "melanoma</w>"]
    assert tok.convert_tokens_to_ids(".</w>") != tok.convert_tokens_to_ids("z</w>")


def test_scenes_tokenizer_names_every_customization_concept_in_one_token_each():
    """Chapter 3's concepts are held-out combinations of pretraining words (issue 16), so the scenes tokenizer
    needs no extra vocabulary: a caption of every customization concept tokenizes word by word."""
    rng = np.random.default_rng(0)
    captions = [scene_caption(pretrain_concepts(rng, 2), str(rng.choice(BACKGROUNDS))) for _ in range(400)]
    empty = np.zeros((0, 8, 8, 3), np.uint8)
    data = DomainData("scenes", "multiconcept", "procedural", "", empty, captions, empty, captions[:5])
    assert extra_vocabulary("scenes") == [] and tokenizer_corpus(data) == captions + captions[:5]
    tok = build_caption_tokenizer(tokenizer_corpus(data))
    for a, b in novel_pairs(75, 0):
        text = scene_caption([a, b], "field")
        assert tok.tokenize(text) == [f"{w}</w>" for w in text.split()], text
    assert len(tok.tokenize("heart")) > 1      # a word no caption holds is split (the check above can fail)


def test_bpe_merges_prefer_frequent_pairs_and_break_ties_by_order():
    """Hand-computed: in {"ab": 2, "ac": 2} the pairs (a, b</w>) and (a, c</w>) tie at 2; the smaller goes first."""
    from collections import Counter

    from ctrlgen.models.tokenizer import _learn_merges

    assert _learn_merges(Counter({"ab": 2, "ac": 2}), budget=10, min_frequency=1) == [("a", "b</w>"), ("a", "c</w>")]
    assert _learn_merges(Counter({"ab": 1, "ac": 3}), budget=10, min_frequency=2) == [("a", "c</w>")]
    assert _learn_merges(Counter({"abc": 1}), budget=1, min_frequency=1) == [("a", "b")]


def test_encode_dataset_equals_encoding_everything_at_once():
    """Chunked encoding (arrays converted per batch, or a pixel tensor) gives the one-batch posterior means."""
    import numpy as np

    from ctrlgen.data.tensors import image_tensor

    model = build_mini_components(load_profile("smoke"), build_caption_tokenizer(["a lesion"]), seed=0)
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        whole = model.encode_images(image_tensor(images))
    torch.testing.assert_close(model.encode_dataset(images, batch_size=2), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_dataset(image_tensor(images), batch_size=3), whole, rtol=1e-5, atol=1e-5)


def _tiny_and_kl_vaes():
    torch.manual_seed(0)
    tiny = mini_vae({"block_out_channels": [8, 8, 8], "blocks_per_level": 1, "latent_channels": 4})
    kl = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return tiny, kl


def test_encode_latents_is_the_tiny_vaes_latents_and_the_kl_vaes_posterior_mode():
    tiny, kl = _tiny_and_kl_vaes()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encode_latents(tiny, x), tiny.encode(x).latents)
        assert torch.equal(encode_latents(tiny, x, sample=True), tiny.encode(x).latents)  # nothing to draw
        dist = kl.encode(x).latent_dist
        assert torch.equal(encode_latents(kl, x), dist.mode())
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(encode_latents(kl, x, sample=True, generator=g1), dist.sample(g2))
    assert encode_latents(tiny, x).shape == (2, 4, 4, 4)


def test_load_vae_returns_the_saved_class_and_weights_and_refuses_an_unknown_class(tmp_path):
    tiny, kl = _tiny_and_kl_vaes()
    for vae, name in ((tiny, "tiny"), (kl, "kl")):
        vae.save_pretrained(tmp_path / name)
        back = load_vae(tmp_path / name)
        assert type(back) is type(vae)
        assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), back.state_dict().values()))
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderOdd"}))
    with pytest.raises(ValueError, match="AutoencoderOdd.*AutoencoderKL, AutoencoderTiny"):
        load_vae(tmp_path / "tiny")


def test_loading_a_saved_tiny_vae_prints_no_unexpected_config_warning(tmp_path, capsys, caplog):
    tiny, _ = _tiny_and_kl_vaes()
    tiny.save_pretrained(tmp_path / "tiny")
    load_vae(tmp_path / "tiny")
    said = capsys.readouterr().err + caplog.text
    assert "were passed to AutoencoderTiny" not in said


def test_vae_encoder_features_of_the_tiny_vae_are_its_levels_and_latent():
    tiny, _ = _tiny_and_kl_vaes()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        maps = VAEEncoderFeatures(tiny).layers(x)
        assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 8, 8, 8), (2, 8, 4, 4), (2, 4, 4, 4)]
        assert torch.allclose(maps[-1], tiny.encode(x * 2 - 1).latents, atol=1e-6)  # [0, 1] in, TAESD's convention
