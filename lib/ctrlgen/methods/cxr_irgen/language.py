"""The language module of CXR-IRGen (§6.3.2): a BART that writes a report from one embedding (stage 1, Eq. 6.2)
and a prior that maps an image embedding to that embedding (stage 2, Eq. 6.3).

Stage 1. BART's encoder reads the report; one *representative embedding* summarises its token states — the
mean over the report's tokens (the thesis's choice), or the [BOS] / [EOS] token's state (Fig. 6.5's
alternatives) — and the decoder reconstructs the report attending to that single vector (cross-attention over
one token), trained with cross-entropy (Eq. 6.2). Encoder and decoder both train (the book's choice: a
from-scratch mini encoder must learn to summarise; the thesis does not say whether bart-base's was frozen).

Stage 2. A ViT-style prior (patches of its input + a [CLS] token, a transformer encoder, a linear head; the
thesis names ViT without a configuration, so width/depth are the book's) maps the image embedding — the
latent z_0 of the denoising backbone; for real images the frozen VAE's latent (the posterior mean for an
AutoencoderKL) — to the frozen stage-1 encoder's representative embedding, trained with L_prior (Eq. 6.3) =
MSE + λ(1 − cos) with λ = 0.01, the cosine written as a true cosine (the printed formula lacks the square
roots). Table 6.5's ablations: ``loss="mse"``, ``loss="cos"``, and raw pixels instead of the latent as the
prior's input.

Inference: label → image (vision module) → z_0 → prior → embedding → BART decoder → report (``write_reports``).

Reports are normalised as R2Gen does for IU X-ray (``clean_report``: lower case, punctuation dropped, " . "
between sentences) and tokenised by words (a word-level ``tokenizers`` vocabulary built from the training
reports on the mini profiles; bart-base's own BPE tokenizer from its folder on the full profile).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast
from transformers.modeling_outputs import BaseModelOutput
from ctrlgen.progress import tqdm

Representative = Literal["mean", "bos", "eos"]
PriorLoss = Literal["mse+cos", "mse", "cos"]
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
DEID = "xxxx"   # IU X-ray's de-identification token


# ============================================================================== text
def clean_report(text: str) -> str:
    """R2Gen's ``clean_report_iu_xray`` (Chen et al. 2020): numbered sentences split, lower case, the
    punctuation ``.,?;*!%^&_+():-[]{}"/\\'`` removed inside sentences, sentences joined by " . ", a final " .".
    Returns "" for an empty report."""
    t = str(text)
    for a, b in (("..", "."), ("..", "."), ("..", "."), ("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "),
                 (". 5. ", ". "), (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". ")):
        t = t.replace(a, b)
    sentences = t.strip().lower().split(". ")
    clean = [re.sub(r"[.,?;*!%^&_+():\-\[\]{}]", "", s.replace('"', "").replace("/", "").replace("\\", "")
                    .replace("'", "").strip().lower()) for s in sentences]
    clean = [" ".join(s.split()) for s in clean if s.strip()]
    return " . ".join(clean) + " ." if clean else ""


def usable_report(text: str) -> tuple[str, str]:
    """``(cleaned report, "")`` or ``("", why)``: empty, or only de-identification tokens ("XXXX")."""
    clean = clean_report(text)
    words = [w for w in clean.split() if w != "."]
    if not words:
        return "", "empty"
    if all(w == DEID for w in words):
        return "", "only XXXX de-identification tokens"
    return clean, ""


def join_findings_impression(findings: str, impression: str) -> str:
    """F+I: findings then impression, as one report (the book's choice: plain concatenation, findings first)."""
    return " ".join(t for t in (clean_report(findings), clean_report(impression)) if t)


def build_report_tokenizer(texts: Sequence[str], max_length: int, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``texts`` (already cleaned) with BART's special tokens, ``<s> … </s>``."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in t.split():
            counts[w] = counts.get(w, 0) + 1
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w in sorted(w for w, c in counts.items() if c >= min_frequency):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)


def small_bart(tokenizer, d_model: int, layers: int, heads: int, ffn: int, max_length: int, seed: int = 0
               ) -> BartForConditionalGeneration:
    """A BART from a small ``BartConfig`` with random weights (mini: trained from scratch)."""
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                        decoder_ffn_dim=ffn, max_position_embeddings=max_length + 2, dropout=0.1,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                        forced_eos_token_id=tokenizer.eos_token_id)
    return BartForConditionalGeneration(config)


# ============================================================================== stage 1
def representative_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor, how: Representative = "mean"
                             ) -> torch.Tensor:
    """One vector per report from the encoder states ``(B, T, D)`` (§6.3.2, Fig. 6.5): the mean over the real
    tokens (``attention_mask`` 1), the first ([BOS]) token's state, or the last real ([EOS]) token's state."""
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if how == "bos":
        return hidden[:, 0]
    if how == "eos":
        last = attention_mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    raise ValueError(f"unknown representative embedding {how!r}: mean, bos or eos")


def _tokenize(tokenizer, texts: Sequence[str], device) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def encode_reports(model: BartForConditionalGeneration, tokenizer, texts: Sequence[str], how: Representative = "mean",
                   batch_size: int = 64) -> torch.Tensor:
    """Representative embeddings ``(N, D)`` of ``texts`` (the stage-2 targets), on the CPU."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = _tokenize(tokenizer, texts[i:i + batch_size], model.device)
            hidden = model.get_encoder()(**enc).last_hidden_state
            out.append(representative_embedding(hidden, enc["attention_mask"], how).cpu())
    return torch.cat(out)


def reconstruction_loss(model: BartForConditionalGeneration, enc: dict[str, torch.Tensor], how: Representative
                        ) -> torch.Tensor:
    """L_CE (Eq. 6.2): the decoder, attending to the one representative embedding, predicts the report."""
    hidden = model.get_encoder()(**enc).last_hidden_state
    rep = representative_embedding(hidden, enc["attention_mask"], how)[:, None]
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return model(encoder_outputs=BaseModelOutput(last_hidden_state=rep), labels=labels).loss


@torch.no_grad()
def decode_embeddings(model: BartForConditionalGeneration, tokenizer, embeddings: torch.Tensor, max_new_tokens: int,
                      num_beams: int = 1, batch_size: int = 64) -> list[str]:
    """Reports written by the decoder from representative embeddings ``(N, D)`` (greedy, or beam search)."""
    model.eval()
    texts: list[str] = []
    for i in range(0, len(embeddings), batch_size):
        rep = embeddings[i:i + batch_size].to(model.device, model.dtype)[:, None]
        ids = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=rep),
                             attention_mask=torch.ones(rep.shape[:2], dtype=torch.long, device=model.device),
                             max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        texts += [" ".join(t.split()) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return texts


@dataclass
class Stage1Result:
    history: list[dict[str, float]] = field(default_factory=list)   # per step: loss
    curve: list[dict[str, float]] = field(default_factory=list)     # per evaluation: step + the evaluator's scores


def train_stage1(model: BartForConditionalGeneration, tokenizer, texts: Sequence[str], steps: int, batch_size: int,
                 lr: float, how: Representative = "mean", seed: int = 0,
                 evaluate: Callable[[BartForConditionalGeneration], dict[str, float]] | None = None,
                 eval_every: int = 0, progress: bool = True) -> Stage1Result:
    """Stage 1 (§6.3.2): AdamW on L_CE of shuffled report batches for ``steps`` steps; ``evaluate(model)``
    every ``eval_every`` steps (and at the end) gives the Fig. 6.5 curves."""
    if not texts:
        raise ValueError("stage 1 needs at least one report")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    result = Stage1Result()
    for step in tqdm(range(1, steps + 1), desc="report stage 1", leave=False, disable=not progress):
        model.train()
        idx = rng.choice(len(texts), size=min(batch_size, len(texts)), replace=len(texts) < batch_size)
        loss = reconstruction_loss(model, _tokenize(tokenizer, [texts[i] for i in idx], model.device), how)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        result.history.append({"step": step, "loss": float(loss.detach())})
        if evaluate is not None and eval_every and (step % eval_every == 0 or step == steps):
            result.curve.append({"step": step, **evaluate(model)})
    model.eval()
    return result


# ============================================================================== stage 2
class PriorViT(nn.Module):
    """ViT-style prior: ``patch``×``patch`` patches of the input ``(B, C, H, W)`` + [CLS] + positions, a
    transformer encoder, the [CLS] state → ``out_dim`` (the representative text embedding)."""

    def __init__(self, in_channels: int, side: int, patch: int, out_dim: int, width: int = 128, depth: int = 2,
                 heads: int = 4):
        super().__init__()
        if side % patch:
            raise ValueError(f"prior input side {side} is not a multiple of its patch size {patch}")
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 1 + (side // patch) ** 2, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)  # norm_first layers cannot nest
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], 1) + self.pos
        return self.head(self.encoder(h)[:, 0])


def prior_loss(pred: torch.Tensor, target: torch.Tensor, lam: float = 0.01, kind: PriorLoss = "mse+cos") -> torch.Tensor:
    """L_prior (Eq. 6.3), per sample then averaged over the batch: (1/m)Σ(y − ŷ)² + λ(1 − cos(y, ŷ)), with
    cos = Σyŷ / (√Σy² √Σŷ²) (a true cosine); ``kind`` "mse" or "cos" keeps one term (Table 6.5's ablations:
    "cos" is 1 − cos without λ, the loss a cosine-similarity objective minimises)."""
    mse = ((pred - target) ** 2).mean(dim=-1)
    cos = 1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    if kind == "mse+cos":
        return (mse + lam * cos).mean()
    if kind == "mse":
        return mse.mean()
    if kind == "cos":
        return cos.mean()
    raise ValueError(f"unknown prior loss {kind!r}: mse+cos, mse or cos")


def train_prior(prior: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int, batch_size: int, lr: float,
                kind: PriorLoss = "mse+cos", lam: float = 0.01, seed: int = 0, progress: bool = True
                ) -> list[dict[str, float]]:
    """Stage 2 (§6.3.2): AdamW on L_prior of random batches of (image embedding, text embedding) pairs."""
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(f"the prior needs as many inputs as targets (and at least one): {len(inputs)} vs {len(targets)}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(prior.parameters(), lr=lr)
    history = []
    device = next(prior.parameters()).device
    prior.train()
    for step in tqdm(range(1, steps + 1), desc=f"prior ({kind})", leave=False, disable=not progress):
        idx = torch.randint(0, len(inputs), (min(batch_size, len(inputs)),), generator=g)
        loss = prior_loss(prior(inputs[idx].to(device)), targets[idx].to(device), lam, kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step, "loss": float(loss.detach())})
    prior.eval()
    return history


@torch.no_grad()
def write_reports(prior: nn.Module, model: BartForConditionalGeneration, tokenizer, inputs: torch.Tensor,
                  max_new_tokens: int, num_beams: int = 1) -> list[str]:
    """Inference (§6.3.2): image embeddings → prior → representative embedding → BART decoder → reports."""
    prior.eval()
    embeddings = torch.cat([prior(inputs[i:i + 256].to(next(prior.parameters()).device)) for i in range(0, len(inputs), 256)])
    return decode_embeddings(model, tokenizer, embeddings, max_new_tokens, num_beams)


__all__ = ["Representative", "PriorLoss", "DEID", "clean_report", "usable_report", "join_findings_impression",
           "build_report_tokenizer", "small_bart", "representative_embedding", "encode_reports", "reconstruction_loss",
           "decode_embeddings", "Stage1Result", "train_stage1", "PriorViT", "prior_loss", "train_prior", "write_reports"]
