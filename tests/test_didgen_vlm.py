"""DermPrompt's real VLM path (§4.3.2) on a randomly initialised TINY Llama-3.2-Vision (Mllama) folder.

No weights or tokenizer files can be downloaded, so the fixture builds everything offline: a byte-level
BPE tokenizer trained on the two DermPrompt instructions, with the Llama 3 special tokens and a Llama-3.2-
Vision-style chat template; an ``MllamaImageProcessor`` with 16x16 single tiles; an ``MllamaConfig`` with a
32-wide, 2-layer vision encoder and a 32-wide, 2-layer text decoder (one cross-attention layer). Model and
``MllamaProcessor`` are saved with ``save_pretrained`` and loaded back by ``HFChatVLM`` through the Auto
classes, exactly as a real checkpoint folder would be. Random weights answer gibberish: the tests check the
plumbing (what reaches ``generate``, what is decoded), not the content.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ctrlgen.methods.didgen.dermprompt import (  # noqa: E402
    EXTRACTION_PROMPT,
    PREFIX,
    REPHRASE_PROMPT,
    CaptionError,
    VLMCaptioner,
    dermprompt_vocabulary,
)
from ctrlgen.methods.didgen.dermprompt.vlm_captioner import _text_message  # noqa: E402
from ctrlgen.models import build_caption_tokenizer  # noqa: E402
from ctrlgen.models.vlm import HFChatVLM  # noqa: E402

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|finetune_right_pad_id|>", "<|python_tag|>"]
IMAGE_TOKEN = "<|image|>"
# the structure of Llama-3.2-Vision-Instruct's template (BOS written by the template, image items as <|image|>)
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for item in message['content'] %}{%- if item['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
VALID_JSON = ('{"lesion_shape": "oval", "lesion_colour": "light brown", "lesion_size": "small", '
              '"lesion_position": "centre", "skin_colour": "light", "hair": "no", "marks": "none"}')
SENTENCE = "a small oval light brown lesion in the centre on light skin"


def _llama_like_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # every byte encodes: no unknown token
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([EXTRACTION_PROMPT, REPHRASE_PROMPT, VALID_JSON, SENTENCE], trainer)
    bpe.add_special_tokens([IMAGE_TOKEN])  # last id, as in Llama 3.2 Vision (image_token_index = vocab_size)
    bos = bpe.token_to_id("<|begin_of_text|>")
    # like the real Llama 3 tokenizer.json: plain tokenisation prepends BOS
    bpe.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    tok = _llama_like_tokenizer()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    processor = MllamaProcessor(MllamaImageProcessor(size={"height": 16, "width": 16}, max_image_tiles=1), tok,
                                chat_template=CHAT_TEMPLATE)
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           intermediate_size=64, image_size=16, patch_size=8, max_num_tiles=1,
                           supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0],
                           vision_output_dim=64),  # hidden_size * (len(intermediate_layers_indices) + 1)
        text_config=dict(vocab_size=image_id, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, cross_attention_layers=[1],
                         max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        image_token_index=image_id)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # cross-attention gates start at 0 (image ignored): open them so the image matters
        for name, p in model.named_parameters():
            if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
                p.fill_(1.0)
    path = tmp_path_factory.mktemp("vlm") / "tiny-llama-3.2-vision"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vlm(folder):
    return HFChatVLM(folder, max_new_tokens=12)


def clip_tokenizer():
    """The CLIP-format caption tokenizer the other didgen tests build (prompt-length checks)."""
    tok = build_caption_tokenizer(dermprompt_vocabulary(), model_max_length=77)
    tok.add_tokens(["<lesion>", "<skin>"])
    return tok


def tiny_image(seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8))


def spy(vlm):
    """Record what ``HFChatVLM`` hands to ``model.generate`` and what it returns."""
    calls = []
    generate = vlm.model.generate

    def recording(**kw):
        out = generate(**kw)
        calls.append((kw, out))
        return out

    vlm.model.generate = recording
    return calls


def test_real_folder_loads_through_the_auto_classes(vlm, folder):
    assert type(vlm.processor).__name__ == "MllamaProcessor"
    assert type(vlm.model).__name__ == "MllamaForConditionalGeneration"
    assert vlm.name == folder.name and vlm.model.dtype == torch.float32 and not vlm.model.training


def test_image_turn_reaches_the_model_and_only_new_tokens_are_decoded(vlm):
    calls = spy(vlm)
    try:
        answer = vlm(_text_message(EXTRACTION_PROMPT, True), tiny_image())
        (kw, out), = calls
        tok = vlm.processor.tokenizer
        ids = kw["input_ids"][0].tolist()
        assert isinstance(answer, str)
        # one BOS (written by the template; the tokeniser must not add a second), one image token, the prompt
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids.count(vlm.model.config.image_token_id) == 1
        assert EXTRACTION_PROMPT in tok.decode(ids)
        # the image went in: pixel values (float, model dtype), tile layout and the cross-attention mask
        assert kw["pixel_values"].shape == (1, 1, 1, 3, 16, 16) and kw["pixel_values"].dtype == vlm.model.dtype
        assert {"aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"} <= set(kw)
        assert kw["max_new_tokens"] == 12 and kw["do_sample"] is False
        # greedy on the prompt + answer tokens; the answer is the decoding of the new tokens only
        new = out[0, len(ids):]
        assert out[0, :len(ids)].tolist() == ids and 1 <= len(new) <= 12
        assert answer == tok.decode(new, skip_special_tokens=True)
        assert "You are a dermatologist" not in answer
    finally:
        del vlm.model.generate


def test_text_only_turn_sends_no_image(vlm):
    calls = spy(vlm)
    try:
        answer = vlm(_text_message(REPHRASE_PROMPT.format(max_words=40, attributes=VALID_JSON), False), None)
        (kw, _), = calls
        ids = kw["input_ids"][0].tolist()
        assert isinstance(answer, str)
        assert "pixel_values" not in kw and "cross_attention_mask" not in kw
        assert vlm.model.config.image_token_id not in ids and ids.count(vlm.processor.tokenizer.bos_token_id) == 1
    finally:
        del vlm.model.generate


def test_answer_depends_on_the_image_and_is_deterministic(vlm):
    msgs = _text_message(EXTRACTION_PROMPT, True)
    a, b = vlm(msgs, tiny_image(0)), vlm(msgs, tiny_image(1))
    assert a != b  # cross-attention gates are open in the fixture: the pixels reach the text decoder
    assert vlm(msgs, tiny_image(0)) == a  # greedy decoding


def test_captioner_on_the_random_model_raises_a_clear_caption_error(folder):
    c = VLMCaptioner(clip_tokenizer(), model_path=folder)
    assert isinstance(c.generate_fn, HFChatVLM) and c.model_name == str(folder)
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with pytest.raises(CaptionError, match=r"^(no JSON object in the VLM answer|VLM answer is not valid JSON)"):
        c.caption(image)  # gibberish is never turned into a caption


def test_real_model_runs_then_its_answer_is_substituted(vlm):
    """The model really generates for both turns; only the returned text is replaced by a valid answer."""
    raw = []

    def generate_fn(messages, image):
        raw.append((image is not None, vlm(messages, image)))
        return VALID_JSON if image is not None else f'"{SENTENCE}."'

    c = VLMCaptioner(clip_tokenizer(), generate_fn=generate_fn, model_name="tiny")
    cap = c.caption(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert [with_image for with_image, _ in raw] == [True, False] and all(isinstance(t, str) for _, t in raw)
    assert cap.source == "vlm" and cap.text == f"{PREFIX}, {SENTENCE}"
    assert cap.attributes.to_dict() == {"size": "small", "shape": "oval", "lesion_colour": "light brown",
                                        "position": "in the centre", "skin_colour": "light", "hair": False,
                                        "marks": []}


@pytest.mark.parametrize("via", ["vlm", "captioner"])
def test_missing_folder_names_the_path(tmp_path, via):
    missing = tmp_path / "no-such-vlm"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no VLM at {missing}")):
        HFChatVLM(missing) if via == "vlm" else VLMCaptioner(build_caption_tokenizer(["a lesion"]), model_path=missing)


def test_dtype_keyword_loads_in_bfloat16_and_casts_the_pixels(folder):
    vlm = HFChatVLM(folder, dtype="bfloat16", max_new_tokens=2)
    calls = spy(vlm)
    assert vlm.model.dtype == torch.bfloat16
    assert isinstance(vlm(_text_message(EXTRACTION_PROMPT, True), tiny_image()), str)
    (kw, _), = calls
    assert kw["pixel_values"].dtype == torch.bfloat16 and kw["input_ids"].dtype == torch.long


def test_hub_id_loads_from_the_models_root_on_the_profile_device(folder, tmp_path):
    from ctrlgen.config import load_profile
    from ctrlgen.models import ModelNotFoundError, load_chat_vlm

    (tmp_path / "org--tiny-vision").symlink_to(folder, target_is_directory=True)  # what `models fetch` would write
    cfg = load_profile("smoke", {"models.root": str(tmp_path), "device": "cpu"})
    vlm = load_chat_vlm(cfg, "org/tiny-vision", dtype="bfloat16", max_new_tokens=2)
    assert vlm.name == "org--tiny-vision" and vlm.model.dtype == torch.bfloat16 and vlm.max_new_tokens == 2
    assert vlm.model.device.type == "cpu"
    with pytest.raises(ModelNotFoundError, match=re.escape(f"no VLM at {tmp_path / 'org--absent'}")):
        load_chat_vlm(cfg, "org/absent")


# ------------------------------------------------------------------------------------------ from the profile
def test_profile_captioner_is_the_vlm_on_the_profile_folder_with_dtype_and_a_counted_fallback(folder):
    from ctrlgen.config import load_profile
    from ctrlgen.methods.didgen import AttributeCaptioner, captioner_from_profile

    smoke = load_profile("smoke")
    assert type(captioner_from_profile(smoke, clip_tokenizer())) is AttributeCaptioner
    cfg = load_profile("smoke", {"didgen.dermprompt.captioner": "vlm", "didgen.dermprompt.vlm_model": str(folder),
                                 "didgen.dermprompt.vlm_dtype": "bfloat16", "didgen.dermprompt.vlm_max_new_tokens": 3,
                                 "device": "cpu"})
    c = captioner_from_profile(cfg, clip_tokenizer())
    assert isinstance(c, VLMCaptioner) and isinstance(c.generate_fn, HFChatVLM)
    assert c.generate_fn.model.dtype == torch.bfloat16 and c.generate_fn.max_new_tokens == 3
    rng = np.random.default_rng(4)
    image, mask = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), np.zeros((16, 16), bool)
    mask[4:12, 4:12] = True
    cap = c.caption(image, mask)  # the random model answers gibberish: the attribute captioner steps in
    assert cap.source == "attributes-fallback"
    assert cap.text == AttributeCaptioner(clip_tokenizer(), prefix=str(cfg.didgen.prefix)).caption(image, mask).text


def test_profile_captioner_errors_name_the_key():
    from ctrlgen.config import ConfigError, load_profile
    from ctrlgen.methods.didgen import captioner_from_profile

    with pytest.raises(ConfigError, match="vlm_model is empty"):
        captioner_from_profile(load_profile("smoke", {"didgen.dermprompt.captioner": "vlm"}), clip_tokenizer())
    with pytest.raises(ConfigError, match="captioner = 'llm' .* expected one of 'attributes', 'vlm'"):
        load_profile("smoke", {"didgen.dermprompt.captioner": "llm"})  # the profile schema refuses it first
    plain = {"didgen": {"prefix": PREFIX, "dermprompt": {"captioner": "llm"}}}  # a mapping no schema checked
    with pytest.raises(ConfigError, match="must be 'attributes' or 'vlm', got 'llm'"):
        captioner_from_profile(plain, clip_tokenizer())
