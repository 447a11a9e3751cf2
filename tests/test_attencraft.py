"""AttenCraft (thesis ch. 3): Stage I masks on hand-built maps, Eq. 3.4–3.5 ratios, ω sampling, Eq. 3.8, W_k/W_v only."""
from __future__ import annotations

from itertools import islice
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ctrlgen.config import load_profile
from ctrlgen.methods.attencraft import (AttenCraftConfig, FeatureRetainingTerm, MaskSettings, SubsetSampler,
                                        attencraft_finetune, concept_masks, mask_iou, refined_maps, sampling_ratios,
                                        stage_one)
from ctrlgen.methods.customization import Customized, add_identifiers, load_state, subset_batches
from ctrlgen.models import build_caption_tokenizer, build_mini_components
from ctrlgen.training import LossContext, attention_alignment_loss

CAPTIONS = ["a photo of a red circle and a blue square on a plain background"]


def tiny():
    cfg = load_profile("smoke", {"models.image_size": 32})
    tok = build_caption_tokenizer(CAPTIONS, model_max_length=16)
    return build_mini_components(cfg, tok)


# --------------------------------------------------------------------------- Stage I (Eq. 3.2–3.3)
def _identity_self(side):
    return torch.eye(side * side)


def test_suppression_squares_the_cross_maps_when_enhancement_is_off():
    cross = torch.tensor([[[0.5, 0.2], [0.1, 0.0]]])
    s = MaskSettings(nu=2.0, enhancement=False)
    out = refined_maps(cross, _identity_self(2), s)  # divided by its maximum 0.25
    assert torch.allclose(out, torch.tensor([[[0.25, 0.04], [0.01, 0.0]]]) / 0.25)
    assert torch.allclose(refined_maps(cross, _identity_self(2), MaskSettings(suppression=False, enhancement=False)), cross / 0.5)


def test_masks_survive_the_tiny_values_of_real_maps():
    # real A_S rows over 1024 pixels are ~1e-3 and A_C ~1e-2: (A_C)^2 ⊗ (A_S)^4 is ~1e-13, under a 1e-8 range floor
    a = torch.tensor([[1.0, 0.0], [0.8, 0.05]])
    b = torch.tensor([[0.0, 1.0], [0.1, 0.9]])
    s = MaskSettings(nu=2.0, tau=4.0)
    sa = torch.full((4, 4), 0.25) + torch.eye(4) * 0.5
    big = concept_masks(torch.stack([a, b]), sa / sa.sum(1, keepdim=True), s)
    tiny = concept_masks(torch.stack([a, b]) * 1e-2, (sa / sa.sum(1, keepdim=True)) * 1e-3, s)
    assert big.any() and torch.equal(big, tiny)


def test_enhancement_is_an_elementwise_power_then_matrix_product():
    # 2x2 image; out[p] = Σ_q A_S[p, q]^τ · Â_C[q] with Â_C one-hot at pixel 0 → A_S[p, 0]^2 (rows not renormalised)
    sa = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.2, 0.8, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.1, 0.0, 0.0, 0.9]])
    cross = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    out = refined_maps(cross, sa, MaskSettings(nu=1.0, tau=2.0, renormalize_rows=False))
    assert torch.allclose(out.flatten(), torch.tensor([0.36, 0.04, 0.25, 0.01]) / 0.36)
    # renormalised rows (the default): A_S[p, 0]^2 / Σ_q A_S[p, q]^2 — row sums 0.52, 0.68, 0.5, 0.82
    out = refined_maps(cross, sa, MaskSettings(nu=1.0, tau=2.0))
    expected = torch.tensor([0.36 / 0.52, 0.04 / 0.68, 0.25 / 0.5, 0.01 / 0.82])
    assert torch.allclose(out.flatten(), expected / expected.max())


def test_renormalised_enhancement_ignores_how_peaked_a_pixels_attention_is():
    """A map constant over the pixels each pixel attends to stays constant: raw (A_S)^τ rows would scale it by each
    row's Σ A_S^τ (peaked rows brighter), the renormalised operator averages and leaves it as it was."""
    sa = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.25, 0.75]])
    cross = torch.ones(1, 2, 2)
    even = refined_maps(cross, sa, MaskSettings(nu=1.0, tau=4.0))
    assert torch.allclose(even, torch.ones(1, 2, 2))
    raw = refined_maps(cross, sa, MaskSettings(nu=1.0, tau=4.0, renormalize_rows=False)).flatten()
    sums = torch.tensor([1.0, 2 * 0.5 ** 4, 2 * 0.5 ** 4, 0.25 ** 4 + 0.75 ** 4])
    assert torch.allclose(raw, sums / sums.max())


def test_delta_mask_hand_case_two_concepts():
    # concept A bright on the left column, B on the right; after min-max each is 1/0 there
    a = torch.tensor([[1.0, 0.0], [0.8, 0.05]])
    b = torch.tensor([[0.0, 1.0], [0.1, 0.9]])
    masks = concept_masks(torch.stack([a, b]), _identity_self(2), MaskSettings(nu=1.0, enhancement=False, gamma=0.1))
    # hand: normalised a = [[1,0],[.8,.05]], b = [[0,1],[.1,.9]]; a−b = [[1,−1],[.7,−.85]] > .1 → left column
    assert masks[0].tolist() == [[True, False], [True, False]]
    assert masks[1].tolist() == [[False, True], [False, True]]


def test_delta_mask_three_concepts_gives_disjoint_masks_exceeding_every_other():
    side = 3
    maps = torch.zeros(3, side, side)
    maps[0, :, 0], maps[1, :, 1], maps[2, :, 2] = 1.0, 1.0, 1.0
    maps[1, 0, 0] = 0.95  # concept 1 nearly ties concept 0 at (0, 0): no mask there (margin 0.05 < γ)
    masks = concept_masks(maps, _identity_self(side), MaskSettings(nu=1.0, enhancement=False, gamma=0.1))
    assert masks.sum(0).max() <= 1  # disjoint
    assert masks[0].tolist() == [[False, False, False], [True, False, False], [True, False, False]]
    assert masks[1][:, 1].all() and masks[2][:, 2].all()


def test_otsu_thresholding_variant_thresholds_each_map_alone():
    from skimage.filters import threshold_otsu
    a = torch.tensor([[1.0, 0.95], [0.0, 0.0]])
    masks = concept_masks(torch.stack([a, a]), _identity_self(2), MaskSettings(nu=1.0, enhancement=False,
                                                                                thresholding="otsu"))
    want = (a.numpy() > threshold_otsu(a.numpy().astype(np.float64))).tolist()
    assert want == [[True, True], [False, False]]
    assert masks[0].tolist() == want and torch.equal(masks[0], masks[1])  # both concepts: the same mask
    delta = concept_masks(torch.stack([a, a]), _identity_self(2), MaskSettings(nu=1.0, enhancement=False))
    assert not delta.any()


def test_mask_iou_by_hand():
    pred = torch.tensor([[[True, True], [False, False]]])
    truth = np.array([[[1, 0], [0, 0]]])
    assert mask_iou(pred, truth).tolist() == [0.5]


# --------------------------------------------------------------------------- Eq. 3.4–3.5
def test_ratios_eq_3_5_hand_case_and_variants():
    s = np.array([3.0, 1.0])  # S̄ = (0.75, 0.25); softmax = e^.75/(e^.75+e^.25) = 0.622459
    r = sampling_ratios(s)
    assert r == pytest.approx([1 - 0.6224593, 0.6224593], abs=1e-6)
    assert sampling_ratios(s, "no_softmax") == pytest.approx([0.25, 0.75])
    assert sampling_ratios(s, "equal") == pytest.approx([0.5, 0.5])
    r3 = sampling_ratios(np.array([2.0, 1.0, 1.0]))  # N = 3: 1 − softmax sums to 2, divided by N − 1
    e = np.exp([0.5, 0.25, 0.25])
    assert r3 == pytest.approx((1 - e / e.sum()) / 2) and r3.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-negative"):
        sampling_ratios(np.array([-1.0, 1.0]))


def test_attention_score_eq_3_4_is_used_by_stage_one_on_given_masks():
    model = tiny()
    tokens = add_identifiers(model, ["circle", "square"])
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    truth = torch.zeros(2, 8, 8)
    truth[0, :, :4], truth[1, :, 4:] = 1, 1
    s = MaskSettings(cross_res=8, self_res=8, score_timesteps=(0, 40), n_top=3)
    st = stage_one(model, latent, "a photo of <v1> and <v2>", tokens.tokens, s, seed=1, masks=truth)
    assert st.masks.shape == (2, 8, 8) and st.scores.shape == (2,) and 0 <= st.timestep <= 300
    # hand: recompute Eq. 3.4 from the same maps
    from ctrlgen.methods.attencraft import token_maps
    g = torch.Generator().manual_seed(1)
    torch.randint(0, 301, (1,), generator=g)
    noise = torch.randn(latent.shape, generator=g)
    per = [token_maps(model, latent, "a photo of <v1> and <v2>", tokens.tokens, t, noise, s, with_self=False)[0]
           for t in (0, 40)]
    want = torch.stack([(m * truth).flatten(1).topk(3).values.mean(1) for m in per]).mean(0)
    assert torch.allclose(st.scores, want, atol=1e-6)


# --------------------------------------------------------------------------- subset sampling (ω)
@pytest.mark.parametrize("omega", [0.1, 0.3, 0.5])
def test_subset_frequencies_follow_omega_and_ratios(omega):
    ratios = np.array([0.3, 0.7])
    draw = SubsetSampler(ratios, omega)
    rng = np.random.default_rng(0)
    n = 20000
    subsets = [draw(rng) for _ in range(n)]
    multi = np.mean([len(s) > 1 for s in subsets])
    # binomial 5-sigma bounds
    assert abs(multi - omega) < 5 * np.sqrt(omega * (1 - omega) / n)
    singles = [s[0] for s in subsets if len(s) == 1]
    share1 = np.mean(np.array(singles) == 1)
    assert abs(share1 - 0.7) < 5 * np.sqrt(0.21 / len(singles))
    assert all(s == (0, 1) for s in subsets if len(s) > 1)


def test_three_concept_groups_are_all_multi_subsets():
    draw = SubsetSampler(np.array([0.2, 0.3, 0.5]), omega=1.0)
    rng = np.random.default_rng(1)
    seen = {draw(rng) for _ in range(400)}
    assert seen == {(0, 1), (0, 2), (1, 2), (0, 1, 2)}


# --------------------------------------------------------------------------- Eq. 3.8
def _ctx(sizes, maps, idx, masks, valid):
    batch = {"subset_size": torch.tensor(sizes), "token_indices": idx, "token_masks": masks, "token_valid": valid}
    return LossContext(batch, torch.zeros(1), torch.zeros(1), torch.zeros(1), SimpleNamespace(cross_by_res=lambda: maps))


def test_eq_3_8_alpha_for_single_concepts_and_one_for_groups():
    maps = {2: torch.zeros(2, 2, 2, 4)}
    maps[2][..., 1] = 1.0  # token 1's map is all ones
    idx = torch.tensor([[1, 0], [1, 2]])
    masks = torch.zeros(2, 2, 2, 2)
    masks[:, 0, 0, :] = 1.0  # half the pixels: ‖1 − M‖² mean = 0.5; token 2's zero map vs 0 mask: 0
    valid = torch.tensor([[True, False], [True, True]])
    term = FeatureRetainingTerm(alpha=0.01)
    # sample 0: |s| = 1, L_attn = 0.5 → 0.005; sample 1: |s| = 2, L_attn = (0.5 + 0.25)/2: token 2 map 0 vs mask half
    masks[1, 1] = masks[1, 0]
    got = term(_ctx([1, 2], maps, idx, masks, valid))
    l1 = 0.5
    l2 = (0.5 + 0.5) / 2
    assert float(got) == pytest.approx((0.01 * l1 + l2) / 2)
    ref = attention_alignment_loss({2: maps[2][1:]}, idx[1:], masks[1:], valid[1:])
    assert float(ref) == pytest.approx(l2)


def test_batches_switch_rec_weight_off_for_groups_and_carry_union_masks():
    model = tiny()
    tokens = add_identifiers(model, ["circle", "square"])
    custom = Customized("AttenCraft", tokens, ("circle", "square"), with_class=False)
    masks = np.zeros((2, 32, 32), bool)
    masks[0, :, :10], masks[1, :, 20:] = True, True
    draw = SubsetSampler(np.array([0.5, 0.5]), 0.5)
    for rec_on_groups in (False, True):
        for b in islice(subset_batches(model, torch.zeros(1, 4, 8, 8), custom, masks, draw, 1, 0, rec_on_groups), 30):
            size = int(b["subset_size"][0])
            assert float(b["rec_weight"][0]) == (1.0 if size == 1 or rec_on_groups else 0.0)
            assert int(b["token_valid"].sum()) == size
            want = masks[:size].any(0) if size == 2 else masks[int(np.argmax([
                b["token_indices"][0, 0] == p for p in (4, 6)]))]
            if size == 2:
                assert np.array_equal(b["mask"][0, 0].numpy() > 0, want)


# --------------------------------------------------------------------------- Stage II: only W_k, W_v change
def test_training_step_changes_only_cross_attention_kv():
    model = tiny()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before_u = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    truth = torch.zeros(2, 32, 32)
    truth[0, :, :16], truth[1, :, 16:] = 1, 1
    cfg = AttenCraftConfig(steps=2, lr=1e-3, cross_res=(8,), omega=0.5,
                           masks=MaskSettings(cross_res=8, self_res=8, score_timesteps=(0,)))
    res = attencraft_finetune(model, latent, ["circle", "square"], cfg, true_masks=truth)
    before_t = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    changed = {n for n, p in model.unet.named_parameters() if not torch.equal(before_u[n], p)}
    assert changed and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed)
    assert set(res.state) == {f"unet.{n}" for n, p in model.unet.named_parameters() if ".attn2.to_k." in n
                              or ".attn2.to_v." in n}
    assert all(torch.equal(before_t[n], p) for n, p in model.text_encoder.named_parameters())
    # the tokens keep their class-name initialisation (frozen, §3.4.1)
    emb = model.text_encoder.get_input_embeddings().weight
    piece = model.tokenizer("circle", add_special_tokens=False)["input_ids"]
    assert torch.allclose(emb[res.custom.tokens.ids[0]], emb[piece].mean(0))
    assert len(res.train.history) == 2 and res.ratios.sum() == pytest.approx(1.0)
    # the stored tensors reproduce the finetuned model on a fresh copy
    fresh = tiny()
    add_identifiers(fresh, ["circle", "square"])
    load_state(fresh, res.state)
    assert all(torch.equal(p, dict(model.unet.named_parameters())[n]) for n, p in fresh.unet.named_parameters())


def test_the_token_variant_also_trains_the_identifier_embeddings_and_nothing_else_of_the_text_encoder():
    """``train_tokens`` (chapter 3's "Mine + tokens" arm): the identifiers' rows of the embedding table move off their
    class-name initialisation; every other row and every other text-encoder weight stays as it was."""
    model = tiny()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    truth = torch.zeros(2, 32, 32)
    truth[0, :, :16], truth[1, :, 16:] = 1, 1
    cfg = AttenCraftConfig(steps=3, lr=1e-2, cross_res=(8,), omega=0.5, train_tokens=True,
                           masks=MaskSettings(cross_res=8, self_res=8, score_timesteps=(0,)))
    before = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    res = attencraft_finetune(model, latent, ["circle", "square"], cfg, true_masks=truth)
    emb = model.text_encoder.get_input_embeddings().weight.detach()
    ids = list(res.custom.tokens.ids)
    piece = model.tokenizer("circle", add_special_tokens=False)["input_ids"]
    assert not torch.allclose(emb[ids[0]], emb[piece].mean(0))  # moved off its class-name initialisation
    table = next(n for n in before if n.endswith("token_embedding.weight"))
    vocab = before[table].shape[0]  # the identifiers were appended after it
    assert torch.equal(emb[:vocab], before[table]) and all(i >= vocab for i in ids)
    changed = {n for n, p in model.text_encoder.named_parameters() if n != table and not torch.equal(before[n], p)}
    assert not changed
    assert any(k.startswith("text_encoder.") for k in res.state)  # the stored tensors carry the tokens
