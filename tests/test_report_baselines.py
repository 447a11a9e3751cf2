"""Report-generation baselines of chapter 6 (R2Gen, M²Trans, CXR-RePaiR): their defining pieces by hand,
causality, and that each learns a two-report toy set exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctrlgen.methods.baselines import captioning, cxr_repair
from ctrlgen.methods.baselines.m2trans import M2Transformer
from ctrlgen.methods.baselines.r2gen import MCLN, R2Gen, RelationalMemory
from ctrlgen.methods.cxr_irgen.language import build_report_tokenizer

REPORTS = ["the heart is enlarged . small left effusion .", "no acute cardiopulmonary process ."]


def _toy():
    tok = build_report_tokenizer(REPORTS, 24)
    images = torch.stack([torch.full((4, 4, 4), -1.0), torch.full((4, 4, 4), 1.0)])
    images[1, :, :2] = -0.5   # not only a mean shift
    return tok, images


def test_mcln_without_memory_signal_is_layer_norm():
    norm = MCLN(8, 6)
    for mlp in (norm.d_gamma, norm.d_beta):
        nn.init.zeros_(mlp[-1].weight)
        nn.init.zeros_(mlp[-1].bias)
    x, m = torch.randn(2, 3, 8), torch.randn(2, 3, 6)
    assert torch.allclose(norm(x, m), F.layer_norm(x, (8,)), atol=1e-6)
    nn.init.constant_(norm.d_beta[-1].bias, 0.5)   # a memory-driven shift moves the output by exactly that
    assert torch.allclose(norm(x, m), F.layer_norm(x, (8,)) + 0.5, atol=1e-6)


def test_relational_memory_gates_by_hand():
    rm = RelationalMemory(8, 2, 2)
    y = torch.randn(3, 8)
    m0 = rm.init[None].expand(3, -1, -1)
    with torch.no_grad():
        rm.u_gates.weight.zero_()
        rm.w_gates.weight.zero_()
        rm.w_gates.bias[:8], rm.w_gates.bias[8:] = 50.0, -50.0   # forget gate 1, input gate 0: memory kept
    assert torch.allclose(rm.step(m0, y), m0, atol=1e-6)
    with torch.no_grad():
        rm.w_gates.bias[:8], rm.w_gates.bias[8:] = -50.0, 50.0   # forget 0, input 1: M_t = tanh(M̃)
        kv = torch.cat([m0, y[:, None]], 1)
        z = rm.attn(m0, kv, kv, need_weights=False)[0]
        expected = torch.tanh(rm.mlp(z + m0) + z + m0)
    assert torch.allclose(rm.step(m0, y), expected, atol=1e-6)


@pytest.mark.parametrize("kind", [R2Gen, M2Transformer])
def test_decoders_are_causal(kind):
    torch.manual_seed(0)
    model = kind(20, 4, 4, 2, 16, 2, 2, 32, 2, 12).eval()
    images, ids = torch.randn(2, 4, 4, 4), torch.randint(4, 20, (2, 7))
    changed = ids.clone()
    changed[:, 5:] = 3
    a, b = model(images, ids), model(images, changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-5) and not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("kind", [R2Gen, M2Transformer])
def test_incremental_decoding_equals_the_full_forward(kind):
    torch.manual_seed(1)
    model = kind(20, 4, 4, 2, 16, 2, 2, 32, 2, 12).eval()
    images, ids = torch.randn(3, 4, 4, 4), torch.randint(4, 20, (3, 6))
    with torch.no_grad():
        full = model(images, ids)
        state = model.start(images)
        steps = torch.stack([model.next_logits(state, ids[:, :t + 1]) for t in range(ids.shape[1])], 1)
    assert torch.allclose(steps, full, atol=1e-5)


def test_meshed_decoder_reads_every_encoder_layer():
    torch.manual_seed(0)
    model = M2Transformer(20, 4, 4, 2, 16, 3, 2, 32, 2, 12)
    encoded = [e.detach().requires_grad_(True) for e in model.encode(torch.randn(2, 4, 4, 4))]
    y = model.embed(torch.randint(4, 20, (2, 5)))
    out = model.decoder[0](y, encoded, captioning.causal_mask(5))
    out.sum().backward()
    assert all(e.grad.abs().sum() > 0 for e in encoded)


@pytest.mark.parametrize("kind", [R2Gen, M2Transformer])
def test_each_captioner_learns_two_reports_exactly(kind):
    tok, images = _toy()
    ids = captioning.tokenize(tok, REPORTS, 24)
    torch.manual_seed(0)
    model = kind(len(tok), 4, 4, 2, 32, 1, 2, 64, 2, 25, dropout=0.0)
    losses = captioning.train_captioner(model, images, ids, tok.pad_token_id, 150, 2, 3e-3, seed=0)
    assert losses[-1] < 0.1 * losses[0]
    assert captioning.write(model, tok, images, 20) == REPORTS



# Losses of the first three steps at seed 0 on the toy set, recorded before the trainers were moved onto the
# shared loop (``captioning.fit_steps``): the same seed must give the same numbers.
PINNED_LOSSES = {"R2Gen": [3.10705304145813, 2.917743444442749, 2.8580846786499023],
                 "M2Transformer": [2.8666350841522217, 2.7655084133148193, 2.769313335418701],
                 "clip": [8.094789505004883, 1.6440656185150146, 0.02030576951801777]}


@pytest.mark.parametrize("name", list(PINNED_LOSSES))
def test_first_losses_are_pinned_at_a_fixed_seed(name):
    tok, images = _toy()
    ids = captioning.tokenize(tok, REPORTS, 24)
    torch.manual_seed(0)
    if name == "clip":
        model = cxr_repair.SmallCLIP(len(tok), tok.pad_token_id, 4, 4, 2, 16, 8)
        losses = cxr_repair.train_clip(model, images, ids, 3, 2, 1e-2, seed=0)
    else:
        model = {"R2Gen": R2Gen, "M2Transformer": M2Transformer}[name](len(tok), 4, 4, 2, 32, 1, 2, 64, 2, 25,
                                                                       dropout=0.0)
        losses = captioning.train_captioner(model, images, ids, tok.pad_token_id, 3, 2, 3e-3, seed=0)
    assert losses == pytest.approx(PINNED_LOSSES[name], rel=1e-6, abs=1e-6)
    assert not model.training  # left in eval mode for decoding



def test_fit_steps_is_seeded_adamw_without_decay_and_leaves_eval_mode():
    """One AdamW step moves a weight by lr·sign(grad) (Adam's first step; no weight decay), the batches come from
    a NumPy generator seeded with ``seed``, and the model ends in eval mode."""
    model = nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(2.0)
    draws = []

    def batch_loss(rng):
        draws.append(int(rng.integers(0, 100)))
        return (model.weight * 3.0).sum()   # gradient +3

    assert captioning.fit_steps(model, batch_loss, 2, 0.5, seed=4) == pytest.approx([6.0, 4.5])
    assert model.weight.item() == pytest.approx(1.0, abs=1e-6) and not model.training
    assert draws == np.random.default_rng(4).integers(0, 100, 2).tolist()


def test_greedy_decode_stops_at_eos():
    class Fixed(nn.Module):   # writes token 5, then EOS (2)
        def forward(self, images, ids):
            logits = torch.zeros(len(ids), ids.shape[1], 8)
            logits[:, :, 5 if ids.shape[1] == 1 else 2] = 1
            return logits
    assert captioning.greedy_decode(Fixed(), torch.zeros(3, 1), 0, 2, 10) == [[5]] * 3


def test_clip_loss_by_hand_and_retrieval_learns_the_pairs():
    n = 3
    feats = torch.eye(n)
    # logit scale log(1) = 0: logits = identity, CE = -log(e / (e + n - 1)) both ways
    expected = -math.log(math.e / (math.e + n - 1))
    assert cxr_repair.clip_loss(feats, feats, torch.tensor(0.0)).item() == pytest.approx(expected, rel=1e-6)
    tok, images = _toy()
    ids = captioning.tokenize(tok, REPORTS, 24)
    model = cxr_repair.SmallCLIP(len(tok), tok.pad_token_id, 4, 4, 2, 16, 8)
    cxr_repair.train_clip(model, images, ids, 60, 2, 1e-2, seed=0)
    assert cxr_repair.retrieve(model, images, ids, REPORTS) == REPORTS
    assert cxr_repair.retrieve(model, images.flip(0), ids, REPORTS) == REPORTS[::-1]


def test_bad_input_is_one_clear_error():
    tok, images = _toy()
    ids = captioning.tokenize(tok, REPORTS, 24)
    model = R2Gen(len(tok), 4, 4, 2, 16, 1, 2, 32, 2, 25)
    with pytest.raises(ValueError, match="3 images, 2 reports"):
        captioning.train_captioner(model, torch.zeros(3, 4, 4, 4), ids, 1, 1, 1, 1e-3, 0)
    with pytest.raises(ValueError, match="side 4 is not a multiple of the patch size 3"):
        captioning.PatchTokens(4, 4, 3, 8)
    with pytest.raises(ValueError, match=">= 2 image–report pairs"):
        cxr_repair.train_clip(cxr_repair.SmallCLIP(len(tok), 1, 4, 4, 2, 8, 4), images[:1], ids[:1], 1, 1, 1e-3, 0)
