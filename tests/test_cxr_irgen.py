"""CXR-IRGen's method (thesis chapter 6): prompts, references, Eq. 6.1, the U-ViT, stage 1 and Eq. 6.3."""
from __future__ import annotations

import math

import pytest
import torch

from ctrlgen.methods.cxr_irgen import (
    NO_REFERENCE, SAME_LABELS, SAME_POSITIVES, ReferencePool, UViT, build_conditions, build_report_tokenizer, check_label,
    clean_report, combine_embeddings, decode_embeddings, encode_reports, finetune_backbone, label_prompt, prior_loss,
    representative_embedding, small_bart, train_stage1, usable_report,
)
from ctrlgen.sampling import text_to_image

from test_didgen_further import tiny_sd

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAN = float("nan")


# ---------------------------------------------------------------- prompts (§6.3.1)
@pytest.mark.parametrize("label, prompt", [
    ({"Cardiomegaly": 1.0, "Edema": 0.0, "Pneumonia": -1.0},
     "A chest X-Ray image with cardiomegaly, without edema, and unclear about pneumonia"),
    ({"Cardiomegaly": 1.0, "Pleural Effusion": 1.0}, "A chest X-Ray image with cardiomegaly, pleural effusion"),
    ({"Edema": 0.0, "Pleural_Thickening": 0.0}, "A chest X-Ray image without edema, pleural thickening"),
    ({"Pneumonia": -1.0}, "A chest X-Ray image unclear about pneumonia"),
    ({"Cardiomegaly": 1.0, "Pneumonia": -1.0}, "A chest X-Ray image with cardiomegaly and unclear about pneumonia"),
    ({"Edema": 0.0, "Pneumonia": -1.0, "Fracture": None}, "A chest X-Ray image without edema and unclear about pneumonia"),
    ({"Edema": NAN, "Fracture": None}, "A chest X-Ray image"),
    ({}, "A chest X-Ray image"),
    ({"No Finding": 1, "Fracture": ""}, "A chest X-Ray image with no finding"),
])
def test_label_prompt_fills_the_three_clauses_and_leaves_empty_ones_out(label, prompt):
    assert label_prompt(label) == prompt


@pytest.mark.parametrize("bad", [2.0, 0.5, "yes", -2])
def test_a_label_value_outside_the_chexpert_values_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=r"'Edema'.*expected 1.0, 0.0, -1.0 or blank"):
        check_label({"Edema": bad}, where="row 3")


def test_reference_selection_same_label_then_same_positives_then_none():
    pool = ReferencePool([
        {"Cardiomegaly": 1.0, "Edema": 0.0},           # 0
        {"Cardiomegaly": 1.0, "Edema": -1.0},          # 1
        {"Cardiomegaly": 1.0, "Edema": 0.0, "Fracture": None},  # 2: same label as 0 (a blank counts as absent)
        {"No Finding": 1.0},                           # 3
    ])
    same = pool.select({"Cardiomegaly": 1.0, "Edema": 0.0})
    assert same.branch == SAME_LABELS and same.index in (0, 2)
    # an image is not its own reference: 0 takes 2, the other image with its label
    assert pool.select({"Cardiomegaly": 1.0, "Edema": 0.0}, exclude=0).index == 2
    # no image with Cardiomegaly 1 / Edema blank: an image with the same positives (any of 0, 1, 2)
    pos = pool.select({"Cardiomegaly": 1.0, "Pneumonia": 0.0})
    assert pos.branch == SAME_POSITIVES and pos.index in (0, 1, 2)
    # image 3 is the only "No Finding": excluding it leaves nothing
    assert pool.select({"No Finding": 1.0}, exclude=3).branch == NO_REFERENCE
    assert pool.select({"No Finding": 1.0}, exclude=3).index is None
    assert pool.select({"Atelectasis": 1.0}).branch == NO_REFERENCE
    assert [r.index for r in pool.select_many([{"No Finding": 1.0}] * 3, seed=4)] == [3, 3, 3]


# ---------------------------------------------------------------- Eq. 6.1
def test_combination_concatenates_one_token_for_the_unet_and_averages_for_the_uvit():
    text = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])          # (B=1, L=2, D=2)
    image = torch.tensor([[5.0, 6.0]])                         # (B=1, D=2)
    cat = combine_embeddings(text, image, "concat")
    assert cat.shape == (1, 3, 2)
    assert cat.tolist() == [[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]
    mean = combine_embeddings(text, image, "mean")
    assert mean.shape == (1, 2, 2)
    assert mean.tolist() == [[[3.0, 4.0], [4.0, 5.0]]]
    assert combine_embeddings(text, None, "none") is text
    with pytest.raises(ValueError, match="does not fit"):
        combine_embeddings(text, torch.zeros(1, 3), "concat")


# ---------------------------------------------------------------- U-ViT
def test_uvit_predicts_the_latent_shape_and_fuses_long_skips_last_in_first_out():
    torch.manual_seed(0)
    net = UViT(sample_size=8, in_channels=4, out_channels=4, patch_size=2, width=16, depth=4, heads=2,
               cross_attention_dim=6, max_condition_tokens=5).eval()
    assert [b.skip_linear is None for b in net.in_blocks] == [True, True]
    assert net.mid_block.skip_linear is None and all(b.skip_linear is not None for b in net.out_blocks)
    seen_in, seen_skip = [], []
    for b in net.in_blocks:
        b.register_forward_hook(lambda m, args, out: seen_in.append(out))
    for b in net.out_blocks:
        b.register_forward_hook(lambda m, args, out: seen_skip.append(args[1]))
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 6)
    out = net(x, torch.tensor([10, 500, 999]), encoder_hidden_states=ctx).sample
    assert out.shape == x.shape
    # out block 0 gets the last in block's output, out block 1 the first's (U-ViT's long skips)
    assert torch.equal(seen_skip[0], seen_in[1]) and torch.equal(seen_skip[1], seen_in[0])
    # the condition reaches the output
    assert not torch.allclose(out, net(x, torch.tensor([10, 500, 999]), encoder_hidden_states=ctx + 1).sample)
    with pytest.raises(ValueError, match="at most 5"):
        net(x, 10, encoder_hidden_states=torch.randn(3, 6, 6))


# ---------------------------------------------------------------- stage 2 loss (Eq. 6.3)
def test_prior_loss_matches_a_hand_computation_and_its_ablations():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    # sample 1: MSE (1 + 1)/2 = 1, cos 0; sample 2: MSE (1 + 1)/2 = 1, cos 1
    assert prior_loss(pred, target, 0.01).item() == pytest.approx(((1 + 0.01 * 1) + (1 + 0.01 * 0)) / 2)
    assert prior_loss(pred, target, 0.01, "mse").item() == pytest.approx(1.0)
    assert prior_loss(pred, target, 0.01, "cos").item() == pytest.approx((1 + 0) / 2)
    # a true cosine: scaling the prediction changes MSE, not the cosine term
    assert prior_loss(pred * 3, target, kind="cos").item() == pytest.approx(0.5)
    # the printed formula without square roots would give 1 - 4/(2*8) = 0.75 for sample 2, not 0
    y, y_hat = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    assert prior_loss(y, y_hat, kind="cos").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="mse\\+cos, mse or cos"):
        prior_loss(pred, target, kind="l1")


# ---------------------------------------------------------------- stage 1
def test_representative_embedding_mean_bos_eos_on_a_hand_case():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]],
                           [[2.0, 2.0], [4.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])     # the second report has one pad token
    assert representative_embedding(hidden, mask, "mean").tolist() == [[3.0, 2.0], [3.0, 1.0]]
    assert representative_embedding(hidden, mask, "bos").tolist() == [[1.0, 0.0], [2.0, 2.0]]
    assert representative_embedding(hidden, mask, "eos").tolist() == [[5.0, 4.0], [4.0, 0.0]]
    with pytest.raises(ValueError, match="mean, bos or eos"):
        representative_embedding(hidden, mask, "cls")


def test_reports_are_cleaned_as_r2gen_and_unusable_ones_named():
    assert clean_report("1. The heart is normal. 2. No effusion (left).") == "the heart is normal . no effusion left ."
    assert usable_report("  ") == ("", "empty")
    assert usable_report("XXXX. XXXX XXXX.") == ("", "only XXXX de-identification tokens")
    assert usable_report("Stable XXXX.") == ("stable xxxx .", "")


def test_stage1_bart_overfits_one_report_from_its_mean_embedding():
    report = clean_report("The heart is enlarged. There is a small right pleural effusion.")
    tok = build_report_tokenizer([report], max_length=32)
    bart = small_bart(tok, d_model=32, layers=1, heads=2, ffn=64, max_length=32, seed=0)
    res = train_stage1(bart, tok, [report], steps=80, batch_size=2, lr=3e-3, how="mean", seed=0)
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert first > 1.0 and last < 0.1 * first
    emb = encode_reports(bart, tok, [report])
    assert emb.shape == (1, 32)
    assert decode_embeddings(bart, tok, emb, max_new_tokens=24) == [report]


# ---------------------------------------------------------------- the hooks into the one loop and entry point
@pytest.fixture(scope="module")
def model():
    return tiny_sd()


def test_prompt_embeds_give_the_same_images_as_the_prompts(model):
    prompts = ["An image of <lesion> on <skin>", "An image of <lesion> on <skin>, a small lesion"]
    ref = text_to_image(model, prompts, num_steps=2, guidance_scale=3.0, seed=1)
    with torch.no_grad():
        cond, uncond = model.encode_prompt(prompts), model.encode_prompt([""])
    got = text_to_image(model, prompts, num_steps=2, guidance_scale=3.0, seed=1, prompt_embeds=cond,
                        negative_prompt_embeds=uncond)
    assert torch.equal(got.images, ref.images)
    with pytest.raises(ValueError, match="1 prompt_embeds for 2 prompts"):
        text_to_image(model, prompts, num_steps=2, prompt_embeds=cond[:1])


def test_finetuning_reads_the_combined_condition_from_the_batch(model):
    prompts = ["An image of <lesion> on <skin>"] * 4
    dim = model.text_encoder.config.hidden_size
    refs = torch.randn(4, dim)
    conds = build_conditions(model, prompts, refs, "concat")
    assert conds.cond.shape[1] == model.tokenizer.model_max_length + 1 and conds.uncond.shape[0] == 1
    assert torch.equal(conds.uncond[0, -1], torch.zeros(dim))           # zero image token in the unconditional
    latents = torch.randn(4, model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    seen = []
    hook = model.unet.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["encoder_hidden_states"].shape),
                                            with_kwargs=True)
    res = finetune_backbone(model, latents, conds, steps=2, batch_size=2, lr=1e-3, dropout=0.0, seed=0,
                            train_config={"progress": False})
    hook.remove()
    model.unet.load_state_dict(before)
    assert res.steps == 2 and all(s[1] == conds.cond.shape[1] for s in seen)
    assert all(math.isfinite(h["loss"]) for h in res.history)
