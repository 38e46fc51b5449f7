"""Lookup-free quantisation (LFQ): image tokens made of sign bits, and a prior over them.

A VQ-VAE looks every latent up in a codebook of K learned vectors; the search and the
sparse codebook updates grow with K. LFQ (MAGVIT-v2) drops the lookup: each of the d
channels of z_e is quantised on its own to its sign, so a token is d bits and the
codebook is the 2^d corners of the cube, with no parameters at all:

    z_e = encoder(x)                   # (B, d, h, w), real numbers
    z_q = sign(z_e) in {-1, +1}^d      # straight-through: dz_q/dz_e := identity
    x_hat = decoder(z_q),   token = sum_i 2^i [z_e,i > 0]   (bit 0 = channel 0, sign(0) = -1)

Stage one minimises (lfq_loss returns each term separately)

    L = ||x - x_hat||^2 + beta ||z_e - sg[z_q]||^2 + lambda (E[H(p(.|z_e))] - gamma H(E[p(.|z_e)]))
    p(c|z_e) = softmax_c(-||z_e - c||^2 / tau)   over all 2^d codes c.

The first entropy makes each latent pick one code, the second (the entropy of the
batch-averaged assignment) spreads the batch over the whole codebook. The softmax
factorises over bits, so the batch average over 2^d codes is one product of two
half-tables: exact up to d = 20; above, a sum over groups of <= 8 bits (an upper bound).
`--quantizer fsq` swaps in the sibling, finite scalar quantisation: each channel is
bounded by tanh and rounded to one of L_i levels, with no entropy or commitment term.
Stage two is a class-conditional causal transformer over the T = h*w tokens,
p(tokens | y) = prod_t p(token_t | token_<t, y), which reads each token from its bits.

Shapes: B batch, d bits per token (channels of z_e), h w token grid (7 x 7), T = h*w, K = 2^d.

Papers: Yu et al. 2024, "Language Model Beats Diffusion -- Tokenizer is Key to Visual
Generation" (MAGVIT-v2, LFQ); Mentzer et al. 2023, "Finite Scalar Quantization".
Run:  python lfq.py                            (d = 10, 1,024 codes; 8 min on 2 CPU cores)
      python lfq.py --quantizer fsq --out runs/fsq                      (FSQ, 1,000 codes)
      python lfq.py --sample-only --ckpt runs/lfq/model.pt --num-samples 500 --out runs/lfq_n500
Default run: runs/lfq/: test MSE 0.0095, all 1,024 codes used, prior 81.2 bits per test image.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import struct
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "lfq"
HERE = Path(__file__).resolve().parent
NUM_CLASSES = 10
EXACT_ENTROPY_MAX_BITS = 20  # L_ent: exact batch entropy over all 2^d codes up to here
GROUP_MAX_BITS = 8           # above: exact within groups of at most this many bits
FULL_SOFTMAX_MAX_BITS = 12   # prior: softmax over 2^d codes up to here, d Bernoulli bits above


# ============================================================ the quantiser: LFQ

def quantize(z_e):
    """z_q = sign(z_e) in {-1, +1} with a straight-through gradient.

    sign(z_e) + (z_e - sg[z_e]) has the value sign(z_e) *exactly* (z - z is exactly 0
    in floating point) and the gradient of the identity, so the decoder sees pure
    +-1 codes while the encoder gets the gradient that arrived at z_q."""
    s = torch.where(z_e > 0, 1.0, -1.0).to(z_e.dtype)  # sign(0) := -1, as [0 > 0] = 0
    return s + (z_e - z_e.detach())


def code_to_index(codes):
    """token = sum_i 2^i [c_i > 0] for codes (..., d) -> (...) int64."""
    d = codes.shape[-1]
    powers = 2 ** torch.arange(d, device=codes.device)  # (d,): 1, 2, 4, ...
    return ((codes > 0).long() * powers).sum(-1)


def index_to_code(tokens, d):
    """The inverse: bit i of the token -> +1 if set else -1. (...) -> (..., d) float."""
    bits = (tokens.unsqueeze(-1) >> torch.arange(d, device=tokens.device)) & 1
    return bits.float() * 2 - 1


# ============================================================ the sibling: FSQ
# Finite scalar quantisation (Mentzer et al. 2023): each channel of z_e is bounded and
# rounded to one of L_i levels instead of to its sign, so the codebook is prod_i L_i
# codes. No codebook parameters and no lookup, like LFQ; unlike LFQ no entropy or
# commitment term: rounding a bounded value onto a small fixed grid keeps the grid in use.
# Levels the paper recommends for about 2^bits codes (its table 1):
FSQ_LEVELS = {8: (8, 6, 5), 10: (8, 5, 5, 5), 12: (7, 5, 5, 5, 5), 14: (8, 8, 8, 6, 5),
              16: (8, 8, 8, 5, 5, 5)}


def fsq_quantize(z_e, levels):
    """z_e (B, d, h, w) -> z_q (B, d, h, w): channel i on L_i levels in [-1, 1].

    bound(z) = tanh(z + shift) (L - 1)(1 - eps) / 2 - offset  lies just inside the range
    of the integers -floor(L/2) .. ceil(L/2) - 1 (offset = 1/2 for even L, whose grid is
    not symmetric; shift = atanh(offset / half) makes bound(0) = 0); it is rounded with a
    straight-through gradient (the gradient of bound) and divided by floor(L/2). The
    paper's code takes tan for the shift; atanh is the exact inverse. `levels`: a tuple
    or the Tokenizer's buffer (a tensor already on the device: nothing built per call)."""
    L = torch.as_tensor(levels, device=z_e.device).to(z_e.dtype).view(1, -1, 1, 1)
    half = (L - 1) * (1 - 1e-3) / 2
    offset = 0.5 * (L % 2 == 0)
    bounded = torch.tanh(z_e + torch.atanh(offset / half)) * half - offset
    rounded = bounded + (torch.round(bounded) - bounded).detach()  # value round(b), gradient of b
    return rounded / (L // 2)


def fsq_code_to_index(codes, levels):
    """token = sum_i k_i prod_{j<i} L_j with digit k_i = code_i floor(L_i/2) + floor(L_i/2)
    in 0 .. L_i - 1 (channel 0 least significant, as for LFQ's bits). (..., d) -> (...)"""
    L = torch.as_tensor(levels, device=codes.device)
    digits = torch.round(codes * (L // 2)).long() + L // 2
    basis = torch.cumprod(torch.cat([L.new_ones(1), L[:-1]]), 0)  # 1, L_0, L_0 L_1, ...
    return (digits * basis).sum(-1)


def fsq_index_to_code(tokens, levels):
    """The inverse: digit k_i = (token // prod_{j<i} L_j) mod L_i -> code. (...) -> (..., d)"""
    L = torch.as_tensor(levels, device=tokens.device)
    basis = torch.cumprod(torch.cat([L.new_ones(1), L[:-1]]), 0)
    digits = tokens.unsqueeze(-1) // basis % L
    return (digits - L // 2).float() / (L // 2)


# ============================================================ the entropy loss

def code_probs(z, tau):
    """p(c|z) = softmax_c(-||z - c||^2 / tau) over the 2^g codes of g bits: (N, g) -> (N, 2^g).

    -||z - c||^2 / tau = (2 z.c - ||z||^2 - ||c||^2) / tau, and ||z||^2 and ||c||^2 = g
    are the same for every code c, so they cancel in the softmax: logits 2 z.c / tau."""
    g = z.shape[1]
    codes = index_to_code(torch.arange(2 ** g, device=z.device), g).to(z.dtype)  # (2^g, g)
    return F.softmax(2 * z @ codes.T / tau, dim=-1)


def batch_entropy(z, tau):
    """H(E_z[p(.|z)]) in nats, over all 2^g codes of the g bits of z (N, g).

    The distance is a sum over bits, so p(c|z) = p(c_low|z_low) p(c_high|z_high) for
    any split of the bits, and the batch-averaged assignment over all 2^g codes is one
    matrix product of the two halves' assignments,
        E_z[p(c_low, c_high|z)] = P_low^T P_high / N,     (2^(g/2), N) @ (N, 2^(g/2)):
    the (N, 2^g) table is never built (N 2^g multiply-adds, memory N 2^(g/2) + 2^g)."""
    n, g = z.shape
    if g <= GROUP_MAX_BITS:
        p_avg = code_probs(z, tau).mean(0)                                   # (2^g,)
    else:
        h = g // 2
        p_avg = code_probs(z[:, :h], tau).T @ code_probs(z[:, h:], tau) / n  # (2^h, 2^(g-h))
    return -(p_avg * p_avg.clamp_min(1e-30).log()).sum()


def entropy_group_bits(bits, form="auto"):
    """Sizes of the groups of bits whose batch entropies L_ent sums, for d = bits.

    exact: (d,); per-bit: (1,) * d; groups: the fewest groups of <= 8 bits, as equal as
    possible (23 = 8 + 8 + 7, 18 = 6 + 6 + 6); auto: exact up to d = 20, groups above."""
    if form == "exact" or (form == "auto" and bits <= EXACT_ENTROPY_MAX_BITS):
        return (bits,)
    if form == "per-bit":
        return (1,) * bits
    n = -(-bits // GROUP_MAX_BITS)
    return tuple(bits // n + (i < bits % n) for i in range(n))


def entropy_terms(z, tau, groups):
    """Per-sample and batch entropy (nats) of p(c|z) = softmax_c(-||z - c||^2 / tau).

    z: (N, d) latent vectors. The softmax over the 2^d codes factorises over bits: bit i
    is +1 with probability sigmoid(l_i), l_i = 4 z_i / tau (the logit gap between c_i = +1
    and c_i = -1), independently of the others. So the per-sample entropy is exactly a
    sum of d binary entropies, H(sigmoid(l)) = softplus(l) - l sigmoid(l). The batch
    entropy is not a sum over bits: `groups` (sizes summing to d, or one size dividing d)
    splits the bits, each group gets its exact batch entropy, and the sum over groups is
    an upper bound on the joint one (sum of marginal entropies >= joint), tight for one
    group of d bits, loosest for d groups of one bit.
    Returns (E_z[H(p(.|z))], H(E_z[p(.|z)]) summed over groups)."""
    n, d = z.shape
    if isinstance(groups, int):
        if d % groups:
            raise ValueError(f"groups of {groups} bits do not divide d = {d}")
        groups = (groups,) * (d // groups)
    if sum(groups) != d:
        raise ValueError(f"group sizes {groups} do not add up to d = {d}")
    l = 4 * z / tau                                                          # (N, d)
    per_sample = (F.softplus(l) - l * torch.sigmoid(l)).sum(1).mean()       # E[H(p(.|z))]
    starts = np.cumsum((0,) + tuple(groups[:-1]))
    batch = sum(batch_entropy(z[:, s:s + g], tau) for s, g in zip(starts, groups))
    return per_sample, batch


# ============================================================ the tokenizer and its objective

class Tokenizer(nn.Module):
    """Conv encoder 28 -> 14 -> 7 to z_e (B, d, 7, 7), LFQ (or FSQ), the mirror decoder.

    levels=None: LFQ, d = bits sign bits, 2^d codes. levels=(L_1, ..): FSQ, d = len(levels)
    channels, prod L_i codes."""

    def __init__(self, bits=10, width=64, levels=None):
        super().__init__()
        c1, c2 = width // 2, width
        self.levels = tuple(levels) if levels else None
        self.dim = len(self.levels) if self.levels else bits              # d, channels of z_e
        self.codebook_size = math.prod(self.levels) if self.levels else 2 ** bits
        if self.levels:  # a buffer: moves with the model, never rebuilt per call
            self.register_buffer("fsq_levels", torch.tensor(self.levels), persistent=False)
        d = self.dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, 2, 1), nn.ReLU(),               # (B, c1, 14, 14)
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),              # (B, c2, 7, 7)
            nn.Conv2d(c2, c2, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(c2, d, 1),                                # (B, d, 7, 7) = z_e
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(d, c2, 3, 1, 1), nn.ReLU(),               # (B, c2, 7, 7)
            nn.Conv2d(c2, c2, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),     # (B, c1, 14, 14)
            nn.ConvTranspose2d(c1, 1, 4, 2, 1),                 # (B, 1, 28, 28)
        )
        # Linear output, clamped to [0, 1] only when shown or scored: a sigmoid
        # would flatten the MSE gradient on the many pure-black pixels.

    def quantize(self, z_e):
        """z_q (B, d, h, w) with straight-through gradients: sign(z_e), or FSQ's rounding."""
        return quantize(z_e) if self.levels is None else fsq_quantize(z_e, self.fsq_levels)

    def to_index(self, codes):
        """Codes (..., d) -> tokens (...)."""
        return code_to_index(codes) if self.levels is None else fsq_code_to_index(codes, self.fsq_levels)

    def to_code(self, tokens):
        """Tokens (...) -> codes (..., d)."""
        return index_to_code(tokens, self.dim) if self.levels is None else fsq_index_to_code(tokens, self.fsq_levels)

    def forward(self, x):
        z_e = self.encoder(x)                  # (B, d, h, w)
        z_q = self.quantize(z_e)               # (B, d, h, w), exactly +-1 for LFQ
        return self.decoder(z_q), z_e, z_q

    def encode(self, x):
        """Tokens (B, h, w) of images x."""
        return self.to_index(self.quantize(self.encoder(x)).permute(0, 2, 3, 1))

    def decode_tokens(self, tokens):
        """Images in [0, 1] from tokens (B, h, w)."""
        z_q = self.to_code(tokens).permute(0, 3, 1, 2)  # (B, d, h, w)
        return self.decoder(z_q).clamp(0, 1)


def lfq_loss(x_hat, x, z_e, z_q, tau=1.0, gamma=1.0, groups=None):
    """Every term of the stage-one loss, separately (means, so scales do not depend on B).

    recon  = mean (x_hat - x)^2 per pixel
    commit = mean (z_e - sg[z_q])^2 per latent dimension
    per_sample, batch = E[H(p(.|z_e))], H(E[p(.|z_e)]) in nats per token
    entropy = per_sample - gamma * batch        (groups: see entropy_terms; None = exact)"""
    d = z_e.shape[1]
    z_flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, d): one row per token
    per_sample, batch = entropy_terms(z_flat, tau, groups or d)
    return {"recon": (x_hat - x).pow(2).mean(),
            "commit": (z_e - z_q.detach()).pow(2).mean(),
            "per_sample": per_sample, "batch": batch,
            "entropy": per_sample - gamma * batch}


def stage_one_loss(model, x, beta, entropy_weight, tau, gamma, groups):
    """The loss to minimise and its logged terms: LFQ's full objective, FSQ's recon alone."""
    x_hat, z_e, z_q = model(x)
    if model.levels is not None:  # FSQ: the reconstruction is the whole loss
        recon = (x_hat - x).pow(2).mean()
        return recon, {"recon": recon}
    t = lfq_loss(x_hat, x, z_e, z_q, tau, gamma, groups)
    loss = t["recon"] + beta * t["commit"] + entropy_weight * t["entropy"]
    return loss, {k: t[k] for k in ("recon", "commit", "per_sample", "batch")}


# ============================================================ the token prior

# --- shared: token prior (deviates: tokens enter as their d bits by a Linear layer, not a 2^d-row table; a per-bit head above 2^12 codes) ---
# Stage two of the VQ family (vqvae.py, vqgan.py, lfq.py): an autoregressive prior over
# the T = h*w tokens of an image in raster order, conditioned on its label y,
#     p(z | y) = prod_t p(z_t | z_<t, y),   fitted by next-token cross-entropy,
# a small causal transformer with its attention written out. Label num_classes means
# "no label": an unconditional prior is trained and sampled with that label only.

class CausalBlock(nn.Module):
    """Pre-norm transformer block: h + attn(LN(h)), then h + MLP(LN(h)).

    attn = softmax(Q K^T / sqrt(d) + mask) V over `heads` heads of size d = width / heads,
    where the mask lets position t attend to positions <= t only."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h):
        B, T, E = h.shape
        d = E // self.heads
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)                 # (B, heads, T, T)
        # -inf before the softmax gives future positions weight exactly 0, and so
        # exactly zero gradient: this line is the whole of causality.
        future = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        att = scores.masked_fill(future, float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(B, T, E))      # (B, T, E)
        return h + self.mlp(self.ln2(h))


class TokenPrior(nn.Module):
    """prior(tokens, labels) -> logits: tokens (B, t), 1 <= t <= T, labels (B,) -> (B, t, K).

    Input position 0 holds a start vector for the label y, input position s > 0 the
    embedding of token z_{s-1}; so output t sees y and z_<t only, and its logits
    predict z_t. The last input token is never read."""

    # >>> deviates
    def __init__(self, codebook_size, seq_len, num_classes=10, width=128, layers=3, heads=4, levels=None):
    # <<< deviates
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.codebook_size, self.seq_len, self.num_classes = codebook_size, seq_len, num_classes
        # >>> deviates
        # A token is read from its code, d numbers (LFQ: 2^d codes of d bits; FSQ: `levels`),
        # by a Linear layer: its size grows with d, not with the 2^d codes.
        self.levels = tuple(levels) if levels else None
        if self.levels:
            self.register_buffer("fsq_levels", torch.tensor(self.levels), persistent=False)
        self.code_dim = len(self.levels) if self.levels else codebook_size.bit_length() - 1
        self.tok_emb = nn.Linear(self.code_dim, width)
        # Output: logits over the K codes, or for K > 2^12 (LFQ) d Bernoulli logits, one per
        # bit, p(z_t | .) = prod_i p(bit_i | .): a factorised head linear in d.
        self.head_kind = "softmax" if codebook_size <= 2 ** FULL_SOFTMAX_MAX_BITS else "bits"
        # <<< deviates
        self.start_emb = nn.Embedding(num_classes + 1, width)  # row num_classes: "no label"
        self.pos_emb = nn.Parameter(0.02 * torch.randn(seq_len, width))
        self.blocks = nn.ModuleList(CausalBlock(width, heads) for _ in range(layers))
        # >>> deviates
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, codebook_size if self.head_kind == "softmax" else self.code_dim)

    def to_code(self, tokens):
        """Tokens (...) -> codes (..., d): +-1 bits (LFQ) or FSQ's numbers in [-1, 1]."""
        if self.levels is None:
            return index_to_code(tokens, self.code_dim)
        return fsq_index_to_code(tokens, self.fsq_levels)
        # <<< deviates

    def forward(self, tokens, labels):
        # >>> deviates
        h = torch.cat([self.start_emb(labels)[:, None], self.tok_emb(self.to_code(tokens[:, :-1]))], 1)
        # <<< deviates
        h = h + self.pos_emb[:h.shape[1]]                                  # (B, t, E)
        for block in self.blocks:
            h = block(h)
        # >>> deviates
        return self.head(self.ln_f(h))                                     # (B, t, K or d)
        # <<< deviates


def prior_nll(prior, tokens, labels):
    """Mean negative log-likelihood per token in nats: -mean_{b,t} log p(z_t | z_<t, y)."""
    logits = prior(tokens, labels)                                         # (B, T, K)
    # >>> deviates
    if prior.head_kind == "bits":  # -log p(z_t | .) = sum over bits of binary cross-entropies
        bits = (prior.to_code(tokens) > 0).to(logits.dtype)                # (B, T, d)
        return F.binary_cross_entropy_with_logits(logits, bits, reduction="none").sum(-1).mean()
    # <<< deviates
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def draw_token(logits, temperature=1.0, top_k=0, generator=None):
    """One token per row from softmax(logits / temperature), restricted to the top_k
    likeliest (0: all; ties with the k-th are kept): logits (B, K) -> tokens (B,)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                    # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_tokens(prior, labels, temperature=1.0, top_k=0, generator=None, prefix=None):
    """Ancestral sampling, z_t ~ p(z_t | z_<t, y) for t = 0..T-1: labels (B,) -> tokens (B, T).

    prefix (B, t0), if given, fixes z_0..z_{t0-1} and sampling continues from there.
    Step t runs the prior on z_0..z_t, where z_t is still a placeholder that output t
    cannot see, and draws z_t from output t. `generator` lives on labels' device."""
    if temperature <= 0 or top_k < 0:
        raise ValueError(f"need temperature > 0 and top_k >= 0 (got {temperature}, {top_k})")
    was_training = prior.training
    prior.eval()
    tokens = torch.zeros(len(labels), prior.seq_len, dtype=torch.long, device=labels.device)
    start = 0
    if prefix is not None:
        start = prefix.shape[1]
        tokens[:, :start] = prefix
    for t in range(start, prior.seq_len):
        logits = prior(tokens[:, :t + 1], labels)[:, t]                    # (B, K)
        # >>> deviates
        if prior.head_kind == "bits":  # each bit from its own Bernoulli; top_k does not apply
            u = torch.rand(logits.shape, generator=generator, device=logits.device)
            tokens[:, t] = code_to_index(torch.where(u < (logits / temperature).sigmoid(), 1.0, -1.0))
            continue
        # <<< deviates
        tokens[:, t] = draw_token(logits, temperature, top_k, generator)
    prior.train(was_training)
    return tokens


def batches(n, batch_size, total, generator=None):
    """Index tensors of `total` mini-batches of range(n), reshuffled every epoch
    (an epoch's last incomplete batch is dropped)."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size {batch_size} needs 1 <= batch size <= {n} examples")
    step = 0
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(n // batch_size):
            if step == total:
                return
            yield order[i * batch_size:(i + 1) * batch_size]
            step += 1


def cosine_lr(step, total, warmup=0):
    """Learning-rate multiplier at step 0, 1, ..: linear warm-up (step + 1) / warmup for
    step < warmup, then 0.5 (1 + cos(pi (step - warmup) / (total - warmup))), from 1
    down to 0 at step = total. Use it as LambdaLR(opt, lambda s: cosine_lr(s, total))."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
# --- end shared ---


# ============================================================ the experiment

CHECK_EVERY = 50  # read the loss (a host-device sync on a GPU) every this many steps


def mnist_tensors(data_dir, split, limit=0):
    """Images as float (N, 1, 28, 28) in [0, 1], and labels (N,); the first `limit` (0: all)."""
    images, labels = load_mnist(data_dir, split)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x[:limit or None], torch.from_numpy(labels)[:limit or None]


def total_steps(n, batch_size, epochs, steps):
    """Optimizer steps of a stage: `epochs` passes over n examples, capped at `steps` (0: no cap)."""
    total = epochs * (n // batch_size)
    return min(total, steps) if steps else total


def train_tokenizer(model, x_train, args, device):
    """Stage one: Adam on the stage-one loss, cosine learning rate. Returns the steps taken."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    total = total_steps(len(x_train), args.batch_size, args.epochs, args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total))
    groups = entropy_group_bits(model.dim, args.entropy)
    progress = Progress(total, label="stage 1")
    model.train()
    for step, idx in enumerate(batches(len(x_train), args.batch_size, total), 1):
        xb = x_train[idx].to(device)
        loss, terms = stage_one_loss(model, xb, args.beta, args.entropy_weight, args.tau,
                                     args.gamma, groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % CHECK_EVERY == 0 or step == total:  # a NaN is caught within CHECK_EVERY steps
            check_finite(step, loss=loss)
        progress.update(step, len(xb), **{k: v.detach() for k, v in terms.items()})
    return total


def train_prior(prior, tokens, labels, args, device):
    """Stage two: AdamW on the prior's NLL of the training tokens (N, T), cosine learning rate."""
    opt = torch.optim.AdamW(prior.parameters(), lr=args.prior_lr, weight_decay=0.01)
    total = total_steps(len(tokens), args.batch_size, args.prior_epochs, args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total))
    progress = Progress(total, label="stage 2")
    prior.train()
    for step, idx in enumerate(batches(len(tokens), args.batch_size, total), 1):
        nll = prior_nll(prior, tokens[idx].to(device), labels[idx].to(device))  # nats per token
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
        sched.step()
        if step % CHECK_EVERY == 0 or step == total:
            check_finite(step, prior_nll=nll)
        progress.update(step, len(idx), bits_per_image=nll.detach() * tokens.shape[1] / math.log(2))
    return total


@torch.no_grad()
def encode_tokens(model, x, device, batch_size=1000):
    """Tokens (N, h, w) of every image."""
    model.eval()
    return torch.cat([model.encode(x[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate_tokenizer(model, x, device, batch_size=1000):
    """Test MSE per pixel, and how the test tokens use the codes: the fraction used at
    least once, and the perplexity exp(H(counts / N)) in codes. Also the tokens (N, h, w)."""
    model.eval()
    se, tokens = 0.0, []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        z_q = model.quantize(model.encoder(xb))
        se += (model.decoder(z_q).clamp(0, 1) - xb).pow(2).sum().item()
        tokens.append(model.to_index(z_q.permute(0, 2, 3, 1)).cpu())
    tokens = torch.cat(tokens)                                                  # (N, h, w)
    counts = torch.bincount(tokens.flatten(), minlength=model.codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    return {"test_recon_mse": se / x.numel(),
            "codebook_usage": (counts > 0).double().mean().item(),
            "codes_used": int((counts > 0).sum()),
            "codebook_size": model.codebook_size,
            "codebook_perplexity": math.exp(-(p * p.log()).sum().item()),
            "bits_per_image": round(tokens[0].numel() * math.log2(model.codebook_size), 2)}, tokens


@torch.no_grad()
def evaluate_prior(prior, tokens, labels, device, batch_size=1000):
    """Mean -log2 p(tokens | y) per test image, in bits; tokens (N, T)."""
    prior.eval()
    nats = sum(prior_nll(prior, tokens[i:i + batch_size].to(device),
                         labels[i:i + batch_size].to(device)).item() * len(tokens[i:i + batch_size])
               for i in range(0, len(tokens), batch_size))
    return nats * tokens.shape[1] / len(tokens) / math.log(2)


@torch.no_grad()
def draw_samples(model, prior, n, temperature, top_k, seed, device):
    """n images (n, 1, 28, 28) in [0, 1] decoded from sampled tokens, and their labels (n,):
    labels 0..9 repeated, so column j of a 10-wide grid holds digits of class j."""
    labels = torch.arange(n, device=device) % NUM_CLASSES
    gen = torch.Generator(device=device).manual_seed(seed)
    print(f"sampling {len(labels)} x {prior.seq_len} tokens", flush=True)
    tokens = sample_tokens(prior, labels, temperature, top_k, generator=gen)  # (n, T)
    return model.decode_tokens(tokens.view(-1, 7, 7)).cpu(), labels.cpu()


# ============================================================ main

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE / "data" / "mnist"),
                   help="folder with the four MNIST idx .gz files (downloaded if missing)")
    p.add_argument("--out", default=f"runs/{SCRIPT}", help="output folder")
    p.add_argument("--bits", type=int, default=10,
                   help="d, bits per token: 2^d codes (LFQ's codebook size; no --codebook-size)")
    p.add_argument("--quantizer", choices=["lfq", "fsq"], default="lfq",
                   help="lfq: sign bits; fsq: finite scalar quantisation, the sibling, with "
                   "the paper's levels for about 2^bits codes (or --levels)")
    p.add_argument("--levels", help="FSQ levels per channel, e.g. 8,5,5,5 (1,000 codes)")
    p.add_argument("--epochs", type=int, default=5, help="stage one (tokenizer) epochs")
    p.add_argument("--prior-epochs", type=int, default=3, help="stage two (prior) epochs; 0 skips it")
    p.add_argument("--steps", type=int, default=0,
                   help="at most this many optimizer steps per stage, and judge steps (0: no cap)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="stage one learning rate")
    p.add_argument("--prior-lr", type=float, default=2e-3, help="stage two learning rate")
    p.add_argument("--width", type=int, default=64, help="channels of the conv layers at 7 x 7")
    p.add_argument("--beta", type=float, default=0.25, help="weight of the commitment term")
    p.add_argument("--entropy-weight", type=float, default=1.0,
                   help="lambda, weight of L_ent (MAGVIT-v2 used 0.1; this small model collapses there)")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of the batch entropy inside L_ent")
    p.add_argument("--tau", type=float, default=1.0, help="temperature of the soft assignment p(c|z_e)")
    p.add_argument("--entropy", choices=["auto", "exact", "groups", "per-bit"], default="auto",
                   help=f"form of the batch entropy in L_ent. exact: over all 2^d codes (d <= "
                   f"{EXACT_ENTROPY_MAX_BITS}); groups: summed over the fewest groups of <= "
                   f"{GROUP_MAX_BITS} bits, as equal as possible (23 = 8 + 8 + 7), an upper bound; "
                   f"per-bit: d groups of 1 bit (the loosest bound: it lets the bits collapse "
                   f"together); auto: exact up to d = {EXACT_ENTROPY_MAX_BITS}, groups above")
    p.add_argument("--prior-width", type=int, default=128, help="D, transformer width")
    p.add_argument("--prior-layers", type=int, default=3)
    p.add_argument("--prior-heads", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the prior")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k likeliest codes (0: all; softmax head only)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=100, help="samples drawn, and N of the judge")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on the first N test images only (0: all 10,000)")
    p.add_argument("--sample-only", action="store_true",
                   help="skip training: load --ckpt, evaluate and sample (-> eval_metrics.json)")
    p.add_argument("--ckpt", help="checkpoint to load with --sample-only")
    return p


def parse_args(argv=None):
    p = build_parser()
    reject_old_flags(p, argv)
    args = p.parse_args(argv)
    check_flags(p, args, positive=("epochs", "batch_size", "lr", "prior_lr", "tau", "temperature",
                                   "num_samples"),
                nonnegative=("prior_epochs", "steps", "test_limit", "top_k", "beta",
                             "entropy_weight", "gamma", "seed"))
    problem = flag_problem(args)  # ranges and combinations the table cannot express
    if problem:
        p.error(problem)
    return args


def build(cfg, device, with_prior):
    """The tokenizer and (with_prior) the prior a configuration describes."""
    levels = parse_levels(cfg["levels"], cfg["bits"]) if cfg["quantizer"] == "fsq" else None
    model = Tokenizer(cfg["bits"], cfg["width"], levels).to(device)
    prior = None
    if with_prior:
        prior = TokenPrior(model.codebook_size, 7 * 7, NUM_CLASSES, cfg["prior_width"],
                           cfg["prior_layers"], cfg["prior_heads"], levels=model.levels).to(device)
    return model, prior


def run(args):
    device = pick_device(args.device)
    out = prepare_out_dir(args.out)
    seed_everything(args.seed)
    x_test, y_test = mnist_tensors(args.data_dir, "test", args.test_limit)
    x_train, y_train = mnist_tensors(args.data_dir, "train")
    steps, train_seconds = [0, 0], 0.0
    if args.sample_only:
        model, prior = load_models(args.ckpt, device, args.top_k)
    else:
        if args.batch_size > len(x_train):
            raise RunError(f"--batch-size {args.batch_size} is larger than the training set "
                           f"({len(x_train)} images)")
        model, prior = build(vars(args), device, args.prior_epochs > 0)
        start = time.time()
        steps[0] = train_tokenizer(model, x_train, args, device)
        if prior is not None:
            tokens = encode_tokens(model, x_train, device).flatten(1)  # (N, T): the prior's data
            steps[1] = train_prior(prior, tokens, y_train, args, device)
        if device.type == "cuda":
            torch.cuda.synchronize()  # GPU work is asynchronous: time it once it is done
        train_seconds = time.time() - start
        save_models(out / "model.pt", model, prior, vars(args))
    metrics, test_tokens = evaluate_tokenizer(model, x_test, device)
    if prior is not None:
        metrics["test_prior_nll_bits"] = evaluate_prior(prior, test_tokens.flatten(1), y_test, device)
        metrics["prior_head"] = prior.head_kind
    samples, labels, recons = write_outputs(model, prior, x_test, args, device, out)
    metrics.update(quantizer="fsq" if model.levels else "lfq",
                   levels=list(model.levels or [2] * model.dim),
                   bits=round(math.log2(model.codebook_size), 2), train_seconds=round(train_seconds, 1),
                   steps_stage1=steps[0], steps_stage2=steps[1], device=str(device),
                   test_images=len(x_test))
    metrics.update(judge_report(out, device, x_train, y_train, x_test, y_test, samples, labels,
                                recons, judge_steps=args.steps or None))
    write_metrics(out / ("eval_metrics.json" if args.sample_only else "metrics.json"), metrics)
    print(json.dumps(metrics))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        sys.exit(f"error: {e}")


# ============================================================ appendix: plumbing every script repeats

# --- shared: run utilities ---
class RunError(Exception):
    """A problem the user can act on (bad file, missing data, diverged loss).

    main() prints it as a single line `error: ...` and exits with status 1."""


def pick_device(name):
    """'auto' takes CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write(path, write):
    """Call write(f) on a fresh temporary file beside `path`, fsync it, rename it over `path`.

    The temporary name is unique (never a user's own `OUT.tmp`), and os.replace is
    atomic: a reader, or a crash, sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            continue
    else:
        raise RunError(f"could not create a temporary file beside {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def prepare_out_dir(out):
    """Create the output folder; refuse, in one line, a path that is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    return out


def save_checkpoint(path, model_state, config):
    """model.pt = {"script", "model": state_dict(s), "config": vars(args)}, atomically."""
    ckpt = {"script": SCRIPT, "model": model_state, "config": config}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path):
    """Load a checkpoint of *this* script with weights_only=True, or fail in one line."""
    if not Path(path).is_file():
        raise RunError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise RunError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        found = ckpt.get("script", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise RunError(f"{path} is a checkpoint of {found}, not of {SCRIPT}.py")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict):
        raise RunError(f"{path}: checkpoint lacks its weights or its config; it is damaged")
    return ckpt


def checkpoint_config(ckpt, required, path="checkpoint"):
    """ckpt["config"], once every key in `required` ({name: type}) holds a value of that type."""
    config = ckpt["config"]
    for name, kind in required.items():
        value = config.get(name)
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise RunError(f"{path}: config {name!r} is {value!r}, not a {kind.__name__}; "
                           "the checkpoint is damaged")
    return config


def load_weights(model, state, path="checkpoint"):
    """model.load_state_dict(state), or one line saying the weights do not fit the model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{path}: the weights do not fit the model its config describes ({first})") \
            from None
    return model


def write_metrics(path, metrics):
    atomic_write(path, lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))


def check_finite(step, **terms):
    """Stop on a NaN/inf loss before it reaches the weights on disk."""
    for name, value in terms.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise RunError(f"non-finite {name} at step {step}; stopped, model.pt left as it was "
                           "(try a lower --lr)")


def check_flags(parser, args, positive=(), nonnegative=(), fraction=()):
    """Validate flags by table: `positive` > 0, `nonnegative` >= 0, `fraction` in [0, 1).

    Names are argparse dests ("lr", "batch_size"); None means "not given" and passes.
    A bad value ends in argparse's usage and one error line (exit status 2)."""
    rules = ([(n, "> 0", lambda v: v > 0) for n in positive]
             + [(n, ">= 0", lambda v: v >= 0) for n in nonnegative]
             + [(n, "in [0, 1)", lambda v: 0 <= v < 1) for n in fraction])
    for name, text, ok in rules:
        value = getattr(args, name)
        if value is not None and not (np.isfinite(value) and ok(value)):
            parser.error(f"--{name.replace('_', '-')} must be {text} (got {value})")


def reject_renamed(parser, argv, renamed):
    """A flag's old spelling fails in one line that names the new one."""
    for arg in (sys.argv[1:] if argv is None else argv):
        old = str(arg).split("=", 1)[0]
        if old in renamed:
            parser.error(f"{old} is now spelled {renamed[old]}")


def format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Prints `step/total | terms | examples/s | eta` at most every `every` seconds."""

    def __init__(self, total, every=5.0, label="train"):
        self.total, self.every, self.label = total, every, label
        self.start = self.last = time.time()
        self.examples = 0

    def update(self, step, examples, **terms):
        self.examples += examples
        now = time.time()
        if now - self.last < self.every and step < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
        values = " ".join(f"{k} {float(v):.4g}" for k, v in terms.items())
        print(f"{self.label} {step}/{self.total} | {values} | "
              f"{self.examples / max(elapsed, 1e-9):.0f} ex/s | eta {format_seconds(eta)}",
              flush=True)
# --- end shared ---


# --- shared: mnist loader ---
# sha256 of the *decompressed* idx files: the same for the copies in data/mnist
# and for every mirror, whatever gzip settings the mirror used.
MNIST_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


def parse_idx(raw, name):
    """Decode an idx file: 0x00 0x00, type 0x08 (uint8), ndim, ndim big-endian sizes, data."""
    ndim = 3 if "images" in name else 1
    magic = 0x0800 + ndim  # 2051 for images, 2049 for labels
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise RunError(f"{name}: bad idx magic number {raw[:4].hex()} (expected {magic:08x}); "
                       "not an MNIST idx file")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    expected = (28, 28) if ndim == 3 else ()
    if shape[1:] != expected or len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
        raise RunError(f"{name}: header says shape {shape} but the file holds "
                       f"{len(raw) - 4 - 4 * ndim} bytes of data; the file is damaged")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def download_mnist_file(name, path):
    """Fetch name.gz from the first mirror that serves it with the right sha256."""
    for mirror in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(mirror + name + ".gz", timeout=30) as r:
                packed = r.read()
            if hashlib.sha256(gzip.decompress(packed)).hexdigest() == MNIST_FILES[name]:
                atomic_write(path, lambda f: f.write(packed))
                return
        except (OSError, EOFError, zlib.error):
            continue
    raise RunError(f"{path} is missing and no mirror could provide it; copy the four MNIST "
                   f"files ({', '.join(n + '.gz' for n in MNIST_FILES)}) into {path.parent}/")


def load_mnist(data_dir, split):
    """Return (images (N, 28, 28) uint8, labels (N,) int64) for split 'train' or 'test'."""
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        path = Path(data_dir) / (name + ".gz")
        if not path.is_file():
            print(f"{path} not found; downloading MNIST", file=sys.stderr)
            download_mnist_file(name, path)
        try:
            raw = gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as e:
            raise RunError(f"{path}: corrupt gzip archive ({e}); delete it to re-download") from None
        arrays.append(parse_idx(raw, name))
    images, labels = arrays
    if len(images) != len(labels):
        raise RunError(f"MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)
# --- end shared ---


# --- shared: png writer ---
def png_bytes(pixels, bit_depth=8):
    """Encode pixels as a PNG file's bytes: uint8 (H, W) grey or (H, W, 3) RGB at bit depth 8,
    or a (H, W) array of 0/1 at bit depth 1 (eight pixels a byte, rows padded to whole bytes)."""
    pixels = np.ascontiguousarray(pixels)
    h, w = pixels.shape[:2]
    if bit_depth == 1:
        if pixels.ndim != 2 or not np.isin(pixels, (0, 1)).all():
            raise ValueError("a 1-bit PNG takes a (H, W) array of 0s and 1s")
        rows = np.packbits(pixels.astype(np.uint8), axis=1)  # (H, ceil(W / 8)), MSB first
        colour_type = 0
    elif bit_depth == 8:
        rows = pixels.astype(np.uint8)
        colour_type = 2 if pixels.ndim == 3 else 0  # 2 = RGB, 0 = greyscale
    else:
        raise ValueError(f"bit depth {bit_depth} is not written here (1 or 8)")
    # Each scanline starts with its filter type; 0 = none.
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)  # no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_png(path, pixels, bit_depth=8):
    atomic_write(path, lambda f: f.write(png_bytes(pixels, bit_depth)))


def image_grid(images, ncol, border=2, border_value=128):
    """Tile images (N, C, H, W) in [0, 1] into one uint8 picture, 2-pixel grey borders."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    grid = np.full((border + nrow * (h + border), border + ncol * (w + border), c),
                   border_value, np.uint8)
    for i in range(n):
        y, x = border + (i // ncol) * (h + border), border + (i % ncol) * (w + border)
        grid[y:y + h, x:x + w] = (images[i].transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    return grid[:, :, 0] if c == 1 else grid
# --- end shared ---


# --- shared: digit judge ---
# One ruler for every image script: a small MNIST classifier whose 128-number penultimate
# features stand in for Inception's in FID. FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2)
# between the features of two image sets (0 for identical sets), and a score
# exp E_x KL(p(y|x) || p(y)) between 1 (one class, or no confident class) and 10.
JUDGE_STEPS = 1500  # Adam steps of 128 digits for the full judge: about 3 epochs, 98.9 % test accuracy


class DigitJudge(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # (B, 64, 7, 7)
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x):  # (B, 1, 28, 28) in [0, 1] -> (B, 128)
        return torch.relu(self.fc(self.conv(x - 0.5).flatten(1)))

    def forward(self, x):  # -> class logits (B, 10)
        return self.head(self.features(x))


def train_judge(x_train, y_train, device, steps, seed=0):
    """Cross-entropy training from a fixed seed, off the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = DigitJudge().to(device)
        opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(x_train), (min(128, len(x_train)),), generator=gen)
            loss = F.cross_entropy(judge(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return judge.eval()


@torch.no_grad()
def judge_outputs(judge, images, batch_size=500):
    """Features (N, 128) and class probabilities (N, 10), float64 numpy."""
    device = next(judge.parameters()).device
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = judge.features(images[i:i + batch_size].to(device, torch.float32).clamp(0, 1))
        feats.append(f.double().cpu())
        probs.append(torch.softmax(judge.head(f).double(), 1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def frechet_distance(feats_a, feats_b):
    """FD between Gaussians fitted to two feature sets (N, F); tr (C_a C_b)^1/2 via the
    symmetric product C_a^1/2 C_b C_a^1/2, which has the same eigenvalues."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) \
        - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(fd, 0.0))


def judge_score(probs):
    """exp E_x KL(p(y|x) || p(y)): high when each image is confidently one digit and all
    ten digits occur (the Inception score, with the judge in Inception's place)."""
    p_y = probs.mean(0, keepdims=True)
    kl = (probs * (np.log(probs + 1e-12) - np.log(p_y + 1e-12))).sum(1)
    return float(np.exp(kl.mean()))


def load_or_train_judge(path, device, x_train, y_train, x_test, y_test, steps):
    """The judge cached at `path`, checked by the sha256 and config in its .json beside it;
    trained again (and cached) when missing, damaged or made with other settings or data.
    Returns the judge and its accuracy on (x_test, y_test)."""
    if x_train.min() < 0 or x_train.max() > 1:
        raise ValueError("the digit judge takes images in [0, 1]")
    path, meta_path = Path(path), Path(path).with_suffix(".json")
    data = hashlib.sha256((x_train[::97] * 255).round().to(torch.uint8).cpu().numpy().tobytes()
                          + y_train.cpu().numpy().astype(np.int64).tobytes()).hexdigest()
    config = {"steps": int(steps), "seed": 0, "train_n": len(x_train), "data": data[:16],
              "version": 2}
    judge = None
    try:
        meta = json.loads(meta_path.read_text())
        blob = path.read_bytes()
        if meta["config"] == config and meta["sha256"] == hashlib.sha256(blob).hexdigest():
            judge = DigitJudge()
            judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            judge = judge.to(device).eval()
    except Exception:  # missing, unreadable or damaged: train a fresh one below
        judge = None
    if judge is None:
        print(f"training the digit judge ({steps} steps) -> {path}", flush=True)
        judge = train_judge(x_train, y_train, device, steps)
        atomic_write(path, lambda f: torch.save(judge.state_dict(), f))
        meta = {"config": config, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    _, probs = judge_outputs(judge, x_test)
    return judge, float((probs.argmax(1) == y_test.cpu().numpy()).mean())


def judge_report(out, device, x_train, y_train, x_test, y_test, samples=None,
                 sample_labels=None, recons=None, judge_steps=None):
    """Judge figures for metrics.json. Every set holds the same N images and is measured
    against the same reference, the test digits after the first N: the samples, the
    reconstructions of the first N test digits, and three anchors (those N real digits,
    the same binarised, uniform noise). judge_steps (smoke runs) trains a smaller judge."""
    steps = JUDGE_STEPS if judge_steps is None else min(int(judge_steps), JUDGE_STEPS)
    name = "digit_judge.pt" if judge_steps is None else f"digit_judge_{steps}steps.pt"
    judge, accuracy = load_or_train_judge(Path(out).resolve().parent / name, device,
                                          x_train, y_train, x_test, y_test, steps)
    sizes = [len(s) for s in (samples, recons) if s is not None]
    n = min(sizes + [len(x_test) // 2])
    ref, _ = judge_outputs(judge, x_test[n:])
    real = x_test[:n].cpu()
    binarised = torch.bernoulli(real, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    report = {"judge_test_accuracy": accuracy, "judge_n": n}
    for key, images in (("anchor_real", real), ("anchor_binarised", binarised),
                        ("anchor_noise", noise), ("sample", samples), ("recon", recons)):
        if images is None:
            continue
        feats, probs = judge_outputs(judge, images[:n])
        report[f"{key}_fd"] = frechet_distance(feats, ref)
        if key != "recon":
            report[f"{key}_score"] = judge_score(probs)
        if key == "sample" and sample_labels is not None:
            asked = torch.as_tensor(sample_labels)[:n].cpu().numpy()
            report["sample_label_match"] = float((probs.argmax(1) == asked).mean())
    return report
# --- end shared ---


# ============================================================ checking flags and configurations (lfq's own)

RENAMED = {"--commit-weight": "--beta", "--prior-dim": "--prior-width"}


def reject_old_flags(parser, argv):
    """Old spellings fail in one line naming the new one; --codebook-size points to --bits."""
    reject_renamed(parser, argv, RENAMED)
    if any(str(a).split("=")[0] == "--codebook-size" for a in (sys.argv[1:] if argv is None else argv)):
        parser.error("LFQ's codebook is the 2^d corners of the cube: set d with --bits "
                     "(--bits 10 = 1,024 codes; FSQ: --levels)")


def flag_problem(args):
    """What is wrong with the flags beyond check_flags' table, or None (checked in this order)."""
    if args.seed >= 2 ** 32:
        return f"--seed must be < 2^32 (got {args.seed})"
    if args.num_samples < 2 or 0 < args.test_limit < 4:  # the judge's Frechet distance needs N >= 2
        return "--num-samples must be at least 2, and --test-limit 0 (all) or at least 4"
    if args.sample_only != bool(args.ckpt):
        return "--sample-only and --ckpt PATH go together"
    problem = config_problem(vars(args))
    if problem:
        return problem
    if args.entropy == "exact" and args.bits > EXACT_ENTROPY_MAX_BITS:
        return (f"--entropy exact builds a 2^d table of the batch's assignment; use groups "
                f"for d > {EXACT_ENTROPY_MAX_BITS}")
    if args.top_k and args.quantizer == "lfq" and args.bits > FULL_SOFTMAX_MAX_BITS:
        return (f"--top-k needs the prior's softmax head (d <= {FULL_SOFTMAX_MAX_BITS}); "
                "above, tokens are sampled bit by bit")
    return None


# Model sizes a flag or a checkpoint may ask for: (lowest, highest).
MODEL_RANGES = {"bits": (1, 24), "width": (2, 1024), "prior_width": (1, 4096),
                "prior_layers": (1, 64), "prior_heads": (1, 64)}


def parse_levels(levels, bits):
    """FSQ levels from '8,5,5,5', or the paper's for --bits; ValueError with what is wrong."""
    if not levels:
        if bits not in FSQ_LEVELS:
            raise ValueError("--quantizer fsq needs --levels L1,L2,... or --bits in "
                             f"{sorted(FSQ_LEVELS)}")
        return FSQ_LEVELS[bits]
    try:
        values = tuple(int(v) for v in levels.split(","))
    except ValueError:
        raise ValueError(f"--levels {levels!r}: give integers separated by commas, "
                         "e.g. 8,5,5,5") from None
    if min(values) < 3:
        raise ValueError("FSQ levels must be at least 3 (2 levels is LFQ's sign)")
    if math.prod(values) > 2 ** MODEL_RANGES["bits"][1]:
        raise ValueError(f"FSQ levels {levels} make more than 2^{MODEL_RANGES['bits'][1]} codes")
    return values


def config_problem(cfg):
    """What is wrong with a model configuration (flags, or a checkpoint's config), or None."""
    for key, (lo, hi) in MODEL_RANGES.items():
        if not lo <= cfg[key] <= hi:
            return f"--{key.replace('_', '-')} must be in {lo}..{hi} (got {cfg[key]})"
    if cfg["prior_width"] % cfg["prior_heads"]:
        return "--prior-width must be a multiple of --prior-heads"
    if cfg["quantizer"] not in ("lfq", "fsq"):
        return f"unknown quantizer {cfg['quantizer']!r}"
    if cfg["quantizer"] == "fsq":
        try:
            levels = parse_levels(cfg["levels"], cfg["bits"])
        except ValueError as e:
            return str(e)
        if cfg["prior_epochs"] and math.prod(levels) > 2 ** FULL_SOFTMAX_MAX_BITS:
            return (f"the prior over FSQ tokens is a softmax over all codes, at most "
                    f"{2 ** FULL_SOFTMAX_MAX_BITS:,}; use --prior-epochs 0")
    elif cfg["levels"]:
        return "--levels is for --quantizer fsq"
    return None


# ============================================================ saving and loading checkpoints (lfq's own)

CONFIG_TYPES = {"bits": int, "width": int, "quantizer": str, "prior_epochs": int,
                "prior_width": int, "prior_layers": int, "prior_heads": int}


def save_models(path, model, prior, config):
    """model.pt with the tokenizer's weights and, when there is one, the prior's."""
    state = {"tokenizer": model.state_dict()}
    if prior is not None:
        state["prior"] = prior.state_dict()
    save_checkpoint(path, state, config)


def load_models(path, device, top_k=0):
    """Tokenizer and prior (or None) from a checkpoint, or one line saying what is wrong
    (also when --top-k asks for a softmax head the checkpoint's prior does not have)."""
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, CONFIG_TYPES, path)
    if cfg.get("levels") is not None and not isinstance(cfg["levels"], str):
        raise RunError(f"{path}: config 'levels' is {cfg['levels']!r}, not a str; "
                       "the checkpoint is damaged")
    cfg = {**cfg, "levels": cfg.get("levels")}
    problem = config_problem(cfg)
    if problem:
        raise RunError(f"{path}: its config is refused ({problem}); the checkpoint is damaged")
    with_prior = "prior" in ckpt["model"]
    model, prior = build(cfg, device, with_prior)
    load_weights(model, ckpt["model"].get("tokenizer"), path)
    if with_prior:
        load_weights(prior, ckpt["model"]["prior"], path)
    if top_k and prior is not None and prior.head_kind == "bits":
        raise RunError(f"--top-k needs a softmax head; {path} samples its {model.dim} "
                       "bits one by one")
    return model, prior


# ============================================================ writing the outputs (lfq's own)

@torch.no_grad()
def write_outputs(model, prior, x_test, args, device, out):
    """recon.png; with a prior samples.png and samples.npy. Returns (samples, labels, recons)
    for the judge: N = --num-samples of each (recons of the first N test digits)."""
    model.eval()
    x = x_test[:args.num_samples]
    recons = torch.cat([model(x[i:i + 1000].to(device))[0].clamp(0, 1).cpu()
                        for i in range(0, len(x), 1000)])
    # recon.png: rows of up to 16 test digits, each row followed by its reconstruction.
    ncol = min(16, len(x_test))
    x = x_test[:64 // ncol * ncol]
    x_hat = model(x.to(device))[0].clamp(0, 1).cpu()
    rows = torch.stack([x.view(-1, ncol, 1, 28, 28), x_hat.view(-1, ncol, 1, 28, 28)], 1)
    write_png(out / "recon.png", image_grid(rows.reshape(-1, 1, 28, 28), ncol=ncol))
    if prior is None:
        return None, None, recons
    samples, labels = draw_samples(model, prior, args.num_samples, args.temperature, args.top_k,
                                   args.seed, device)
    atomic_write(out / "samples.npy", lambda f: np.save(f, samples.numpy()))  # (N, 1, 28, 28) in [0, 1]
    write_png(out / "samples.png", image_grid(samples, ncol=min(args.num_samples, 10)))
    return samples, labels, recons


if __name__ == "__main__":
    main()
