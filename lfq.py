"""Lookup-free quantisation (LFQ): image tokens made of sign bits, and a prior over them.

A VQ-VAE looks every latent up in a codebook of K learned vectors; the search and the
sparse codebook updates grow with K. LFQ (MAGVIT-v2) drops the lookup: each of the d
channels of z_e is quantised on its own to its sign, so a token is d bits and the
codebook is the 2^d corners of the cube, with no parameters at all:

    z_e = encoder(x)                   # (B, d, h, w), real numbers
    z_q = sign(z_e) in {-1, +1}^d      # straight-through: dz_q/dz_e := identity
    x_hat = decoder(z_q),   token = sum_i 2^i [z_e,i > 0]   (bit 0 = channel 0, sign(0) = -1)

Stage one minimises (Tokenizer.forward returns each term separately)

    L = ||x - x_hat||^2 + beta ||z_e - sg[z_q]||^2 + lambda (E[H(p(.|z_e))] - gamma H(E[p(.|z_e)]))
    p(c|z_e) = softmax_c(-||z_e - c||^2 / tau)   over all 2^d codes c.

The first entropy makes each latent pick one code, the second (the entropy of the
batch-averaged assignment) spreads the batch over the whole codebook. The softmax
factorises over bits, so the batch average over 2^d codes is one product of two
half-tables: exact up to d = 20; above, a sum over groups of <= 8 bits (an upper bound).
`--quantizer fsq` swaps in the sibling, finite scalar quantisation: each channel is
bounded by tanh and rounded to one of L_i levels, with no entropy or commitment term.
Stage two, a causal transformer over the T = h*w tokens (each read from its code), fits
p(tokens | y) = prod_t p(token_t | token_<t, y), y the class (unlabelled data: one class).

Papers: Yu et al. 2024, "Language Model Beats Diffusion -- Tokenizer is Key to Visual
Generation" (MAGVIT-v2, LFQ); Mentzer et al. 2023, "Finite Scalar Quantization".
Run: python lfq.py [--quantizer fsq] [--data my_images.npy]   (8 min on 2 CPU cores), then
     python lfq.py --sample-only --ckpt runs/lfq/model.pt --num-samples 500
Default run: runs/lfq/: test MSE 0.0096, all 1,024 codes used, prior 78.6 bits per test image.
Shapes: B batch, C H W image (H, W multiples of 4), d bits per token (channels of z_e),
h w = H/4 W/4 token grid, T = h*w, K = 2^d codes.
"""

import argparse, gzip, json, math, os, random, struct, sys, time, zlib  # the appendix needs most
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "lfq"
DOWNSAMPLE = 4               # two stride-2 convolutions: tokens h, w = H/4, W/4
EXACT_ENTROPY_MAX_BITS = 20  # L_ent: exact batch entropy over all 2^d codes up to here
GROUP_MAX_BITS = 8           # above: exact within groups of at most this many bits
FULL_SOFTMAX_MAX_BITS = 12   # the prior: a softmax over at most 2^12 codes


# ============================================================ the quantiser: LFQ

def quantize(z_e):
    """z_q = sign(z_e) in {-1, +1} with a straight-through gradient: sign(z_e) + (z_e - sg[z_e])
    has the value sign(z_e) *exactly* (z - z is exactly 0 in floating point) and the gradient
    of the identity, so the decoder sees pure +-1 codes while the encoder gets the gradient
    that arrived at z_q."""
    s = torch.where(z_e > 0, 1.0, -1.0).to(z_e.dtype)  # sign(0) := -1, as [0 > 0] = 0
    return s + (z_e - z_e.detach())


def code_to_index(codes):
    """token = sum_i 2^i [c_i > 0] for codes (..., d) -> (...) int64."""
    powers = 2 ** torch.arange(codes.shape[-1], device=codes.device)  # (d,): 1, 2, 4, ...
    return ((codes > 0).long() * powers).sum(-1)


def index_to_code(tokens, d):
    """The inverse: bit i of the token -> +1 if set else -1. (...) -> (..., d) float."""
    bits = (tokens.unsqueeze(-1) >> torch.arange(d, device=tokens.device)) & 1
    return bits.float() * 2 - 1


# ============================================================ the sibling: FSQ
# Finite scalar quantisation (Mentzer et al. 2023): each channel of z_e is bounded and rounded to
# one of L_i levels instead of to its sign: prod_i L_i codes, no parameters and no lookup, like LFQ;
# unlike LFQ, no entropy or commitment term: rounding a bounded value onto a small fixed grid keeps
# the grid in use. The paper's levels for about 2^bits codes (its table 1):
FSQ_LEVELS = {8: (8, 6, 5), 10: (8, 5, 5, 5), 12: (7, 5, 5, 5, 5), 14: (8, 8, 8, 6, 5), 16: (8, 8, 8, 5, 5, 5)}


def fsq_quantize(z_e, levels):
    """z_e (B, d, h, w) -> z_q (B, d, h, w): channel i on L_i levels in [-1, 1].

    bound(z) = tanh(z + shift) (L - 1)(1 - eps) / 2 - offset  lies just inside the range
    of the integers -floor(L/2) .. ceil(L/2) - 1 (offset = 1/2 for even L, whose grid is
    not symmetric; shift = atanh(offset / half) makes bound(0) = 0); it is rounded with a
    straight-through gradient (the gradient of bound) and divided by floor(L/2). The
    paper's code takes tan for the shift; atanh is the exact inverse. levels: tuple or tensor."""
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
    """(E_z[H(p(.|z))], H(E_z[p(.|z)])): per-sample and batch entropy in nats of the soft
    assignment p(c|z) = softmax_c(-||z - c||^2 / tau) of latents z (N, d) to the 2^d codes.

    The softmax factorises over bits: bit i is +1 with probability sigmoid(l_i), l_i = 4 z_i
    / tau (the logit gap between c_i = +1 and c_i = -1), independently of the others. So the
    per-sample entropy is exactly a sum of d binary entropies, H(sigmoid(l)) = softplus(l) -
    l sigmoid(l). The batch entropy is not a sum over bits: `groups` (sizes summing to d, or
    one size dividing d) splits the bits, each group gets its exact batch entropy, and their
    sum is an upper bound on the joint one (sum of marginal entropies >= joint), tight for
    one group of d bits, loosest for d groups of one bit."""
    n, d = z.shape
    groups = (groups,) * (d // groups) if isinstance(groups, int) else groups
    l = 4 * z / tau                                                          # (N, d)
    per_sample = (F.softplus(l) - l * torch.sigmoid(l)).sum(1).mean()       # E[H(p(.|z))]
    starts = np.cumsum((0,) + tuple(groups[:-1]))
    batch = sum(batch_entropy(z[:, s:s + g], tau) for s, g in zip(starts, groups))
    return per_sample, batch


# ============================================================ the tokenizer and its objective

class Tokenizer(nn.Module):
    """Conv encoder H x W -> H/2 x W/2 -> h x w = H/4 x W/4 to z_e (B, d, h, w), LFQ (or
    FSQ), the mirror decoder, for images of C channels. levels=None: LFQ, d = bits sign
    bits, 2^d codes; levels=(L_1, ..): FSQ, d = len(levels) channels, prod L_i codes."""

    def __init__(self, bits=10, width=64, levels=None, channels=1):
        super().__init__()
        c1, c2 = width // 2, width
        self.levels = tuple(levels) if levels else None
        self.dim = d = len(self.levels) if self.levels else bits          # d, channels of z_e
        self.codebook_size = math.prod(self.levels) if self.levels else 2 ** bits
        # FSQ's levels as a buffer (None for LFQ): it moves with the model, never rebuilt per call
        self.register_buffer("fsq_levels", torch.tensor(self.levels) if levels else None, persistent=False)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, c1, 4, 2, 1), nn.ReLU(),        # (B, c1, H/2, W/2)
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),              # (B, c2, h, w)
            nn.Conv2d(c2, c2, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(c2, d, 1))                                # (B, d, h, w) = z_e
        self.decoder = nn.Sequential(
            nn.Conv2d(d, c2, 3, 1, 1), nn.ReLU(),               # (B, c2, h, w)
            nn.Conv2d(c2, c2, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),     # (B, c1, H/2, W/2)
            nn.ConvTranspose2d(c1, channels, 4, 2, 1))          # (B, C, H, W)
        # Linear output, clamped to [0, 1] only when shown or scored: a sigmoid
        # would flatten the MSE gradient on the many pure-black pixels.

    def quantize(self, z_e):  # z_q (B, d, h, w), straight-through: sign(z_e), or FSQ's rounding
        return quantize(z_e) if self.levels is None else fsq_quantize(z_e, self.fsq_levels)

    def to_index(self, codes):  # codes (..., d) -> tokens (...)
        return code_to_index(codes) if self.levels is None else fsq_code_to_index(codes, self.fsq_levels)

    def to_code(self, tokens):  # tokens (...) -> codes (..., d)
        return index_to_code(tokens, self.dim) if self.levels is None else fsq_index_to_code(tokens, self.fsq_levels)

    def forward(self, x, tau=1.0, groups=None):
        """x (B, C, H, W) -> (x_hat (B, C, H, W), every term of the stage-one loss), as means
        so their scales do not depend on B (stage_one_loss weighs them into L):
            recon  = mean (x_hat - x)^2 per pixel (FSQ's only term)
            commit = mean (z_e - sg[z_q])^2 per latent dimension
            per_sample, batch = E[H(p(.|z_e))], H(E[p(.|z_e)]) in nats per token
        groups: the batch entropy's groups of bits (entropy_terms; None: the default form)."""
        z_e = self.encoder(x)                  # (B, d, h, w)
        z_q = self.quantize(z_e)               # (B, d, h, w), exactly +-1 for LFQ
        x_hat = self.decoder(z_q)
        terms = {"recon": (x_hat - x).pow(2).mean()}
        if self.levels is None:  # LFQ; FSQ has no entropy or commitment term
            terms["commit"] = (z_e - z_q.detach()).pow(2).mean()
            z_flat = z_e.permute(0, 2, 3, 1).reshape(-1, self.dim)  # (B*h*w, d): one row per token
            terms["per_sample"], terms["batch"] = entropy_terms(z_flat, tau, groups or entropy_group_bits(self.dim))
        return x_hat, terms

    def encode(self, x):  # images (B, C, H, W) -> tokens (B, h, w)
        return self.to_index(self.quantize(self.encoder(x)).permute(0, 2, 3, 1))

    def decode_tokens(self, tokens):  # tokens (B, h, w) -> images in [0, 1]
        z_q = self.to_code(tokens).permute(0, 3, 1, 2)  # (B, d, h, w)
        return self.decoder(z_q).clamp(0, 1)


def stage_one_loss(terms, beta=0.25, entropy_weight=1.0, gamma=1.0):
    """L = recon + beta commit + lambda (per_sample - gamma batch) from forward's terms: low
    when each token is sure of its code and the batch spreads over all codes. FSQ: recon."""
    if "commit" not in terms:
        return terms["recon"]
    return terms["recon"] + beta * terms["commit"] + entropy_weight * (terms["per_sample"] - gamma * terms["batch"])


# ============================================================ the token prior

# --- shared: token prior (deviates: a token enters as its code, d numbers, by a Linear layer, not a K-row table) ---
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
        # A token is read from its code, d numbers (LFQ: its d bits; FSQ: one per channel), by a Linear
        # layer: codes that share bits share parts of their embedding; its size grows with d, not 2^d.
        self.register_buffer("fsq_levels", torch.tensor(levels) if levels else None, persistent=False)
        self.code_dim = len(levels) if levels else codebook_size.bit_length() - 1
        self.tok_emb = nn.Linear(self.code_dim, width)
        # <<< deviates
        self.start_emb = nn.Embedding(num_classes + 1, width)  # row num_classes: "no label"
        self.pos_emb = nn.Parameter(0.02 * torch.randn(seq_len, width))
        self.blocks = nn.ModuleList(CausalBlock(width, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, codebook_size)

    def forward(self, tokens, labels):
        # >>> deviates
        t, L = tokens[:, :-1], self.fsq_levels  # the tokens read, as their codes (B, t, d)
        code = index_to_code(t, self.code_dim) if L is None else fsq_index_to_code(t, L)
        h = torch.cat([self.start_emb(labels)[:, None], self.tok_emb(code)], 1)
        # <<< deviates
        h = h + self.pos_emb[:h.shape[1]]                                  # (B, t, E)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))                                     # (B, t, K)


def prior_nll(prior, tokens, labels):
    """Mean negative log-likelihood per token in nats: -mean_{b,t} log p(z_t | z_<t, y)."""
    logits = prior(tokens, labels)                                         # (B, T, K)
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

def train_tokenizer(model, x_train, args, device):
    """Stage one: Adam on the stage-one loss, cosine learning rate. Returns the steps taken."""
    total = min(args.epochs * (len(x_train) // args.batch_size), args.steps or math.inf)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total))
    groups, progress = entropy_group_bits(model.dim, args.entropy), Progress(total, label="stage 1")
    model.train()
    for step, idx in enumerate(batches(len(x_train), args.batch_size, total), 1):
        _, terms = model(x_train[idx].to(device), groups=groups)
        loss = stage_one_loss(terms, args.beta, args.entropy_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress(step, len(idx), **{k: v.detach() for k, v in terms.items()})
    return total


def train_prior(prior, model, x_train, labels, args, device):
    """Stage two: AdamW on the prior's NLL of the training images' tokens, cosine learning rate,
    each batch tokenised as it comes (a short run tokenises only what it sees). Returns the steps."""
    total = min(args.prior_epochs * (len(x_train) // args.batch_size), args.steps or math.inf)
    opt = torch.optim.AdamW(prior.parameters(), lr=args.prior_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total))
    progress = Progress(total, label="stage 2")
    model.eval()
    prior.train()
    for step, idx in enumerate(batches(len(x_train), args.batch_size, total), 1):
        with torch.no_grad():
            tokens = model.encode(x_train[idx].to(device)).flatten(1)             # (B, T)
        nll = prior_nll(prior, tokens, labels[idx].to(device))                  # nats per token
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
        sched.step()
        progress(step, len(idx), bits_per_image=nll.detach() * tokens.shape[1] / math.log(2))
    return total


@torch.no_grad()
def evaluate(model, prior, x, labels, device, batch_size=1000):
    """(metrics, tokens (N, h, w)): test MSE per pixel, codes used at least once, perplexity
    exp(H(counts / N)) in codes; with a prior, -log2 p(tokens | y) per test image in bits."""
    model.eval()
    se, nats, tokens, progress = 0.0, 0.0, [], Progress(len(x), label="evaluate")
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        z_q = model.quantize(model.encoder(xb))
        se += (model.decoder(z_q).clamp(0, 1) - xb).pow(2).sum().item()
        tokens.append(model.to_index(z_q.permute(0, 2, 3, 1)))                  # (b, h, w)
        if prior is not None:
            nll = prior_nll(prior.eval(), tokens[-1].flatten(1), labels[i:i + batch_size].to(device))
            nats += nll.item() * len(xb)                                        # nats per token
        progress(i + len(xb), len(xb))
    tokens = torch.cat(tokens).cpu()                                            # (N, h, w)
    counts = torch.bincount(tokens.flatten(), minlength=model.codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    metrics = {"test_recon_mse": se / x.numel(), "codebook_usage": (counts > 0).double().mean().item(),
               "codes_used": int((counts > 0).sum()), "codebook_size": model.codebook_size,
               "codebook_perplexity": math.exp(-(p * p.log()).sum().item()),
               "bits_per_image": round(tokens[0].numel() * math.log2(model.codebook_size), 2)}
    if prior is not None:
        metrics["test_prior_nll_bits"] = nats * tokens[0].numel() / len(x) / math.log(2)
    return metrics, tokens


@torch.no_grad()
def draw_samples(model, prior, n, grid, temperature=1.0, top_k=0, seed=0, chunk=100):
    """n images (n, C, H, W) in [0, 1] decoded from sampled token grids (h, w), and their labels:
    0..num_classes-1 repeated (column j of a 10-wide grid holds class j), or all 0 = "no label"."""
    labels = torch.arange(n, device=prior.pos_emb.device) % max(prior.num_classes, 1)
    gen = torch.Generator(device=labels.device).manual_seed(seed)
    images, threads, progress = [], torch.get_num_threads(), Progress(n, label="sample")
    torch.set_num_threads(1)  # T steps on small tensors: 8x faster than 2 threads on 2 cores
    try:
        for i in range(0, n, chunk):
            tokens = sample_tokens(prior, labels[i:i + chunk], temperature, top_k, gen)  # (b, T)
            images.append(model.decode_tokens(tokens.view(-1, *grid)).cpu())
            progress(i + len(tokens), len(tokens))
    finally:
        torch.set_num_threads(threads)
    return torch.cat(images), labels.cpu()


@torch.no_grad()
def write_outputs(model, prior, x_test, args, device, out):
    """recon.npy (the first min(500, N) test images reconstructed) and recon.png; with a
    prior, samples.npy, samples.png and, when they were asked for classes, sample_labels.npy."""
    x = x_test[:500]
    x_hat = model(x.to(device))[0].clamp(0, 1).cpu()                            # (n, C, H, W)
    atomic_write(out / "recon.npy", lambda f: np.save(f, x_hat.numpy()))
    ncol = min(16, len(x))
    n = min(64, len(x)) // ncol * ncol  # whole rows of test images, each over its reconstructions
    rows = torch.stack([x[:n].view(-1, ncol, *x.shape[1:]), x_hat[:n].view(-1, ncol, *x.shape[1:])], 1)
    write_png(out / "recon.png", image_grid(rows.flatten(0, 2), ncol=ncol))
    if prior is not None:
        grid = (x.shape[2] // DOWNSAMPLE, x.shape[3] // DOWNSAMPLE)
        samples, labels = draw_samples(model, prior, args.num_samples, grid, args.temperature, args.top_k, args.seed)
        atomic_write(out / "samples.npy", lambda f: np.save(f, samples.numpy()))
        if prior.num_classes:
            atomic_write(out / "sample_labels.npy", lambda f: np.save(f, labels.numpy()))
        write_png(out / "samples.png", image_grid(samples, ncol=min(args.num_samples, 10)))


# ============================================================ main

MODEL_FLAGS = ("quantizer", "bits", "width", "prior_width", "prior_layers", "prior_heads")  # they shape the model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, nonnegative_float = p.add_argument, checked(float, lambda v: 0 <= v < math.inf, ">= 0")
    add("--data", default="mnist", help="mnist, or a .npy of images (N, H, W) or (N, C, H, W); H, W multiples of 4")
    add("--data-dir", default=str(Path(__file__).resolve().parent / "data" / "mnist"), help="MNIST's folder")
    add("--out", help="output folder (None: runs/lfq, or with --sample-only sample_only/ beside --ckpt)")
    add("--quantizer", choices=["lfq", "fsq"], default="lfq", help="sign bits, or finite scalar quantisation")
    add("--bits", type=checked(int, lambda v: 1 <= v <= 24, "in 1..24"), default=10,
        help=f"d, bits per token: 2^d codes (FSQ: the paper's levels for about 2^d codes, d in {sorted(FSQ_LEVELS)})")
    add("--width", type=checked(int, lambda v: v >= 2, ">= 2"), default=64, help="channels of the conv layers")
    add("--epochs", type=positive_int, default=5, help="stage one (tokenizer) epochs")
    add("--prior-epochs", type=nonnegative_int, default=3, help="stage two (prior) epochs; 0: no prior")
    add("--steps", type=nonnegative_int, default=0, help="cap on each stage's steps (0: none; 2: a smoke run)")
    add("--batch-size", type=positive_int, default=128, help="images per step, both stages")
    add("--lr", type=positive_float, default=2e-3, help="stage one learning rate")
    add("--prior-lr", type=positive_float, default=2e-3, help="stage two learning rate")
    add("--beta", type=nonnegative_float, default=0.25, help="weight of the commitment term")
    add("--entropy-weight", type=nonnegative_float, default=1.0,
        help="lambda, weight of L_ent (MAGVIT-v2 used 0.1; this small model collapses there)")
    add("--entropy", choices=["auto", "exact", "groups", "per-bit"], default="auto", help="L_ent's batch entropy: "
        "exact, or summed (a bound) over groups of <= 8 bits (23 = 8 + 8 + 7) or single bits; auto: exact to d = 20")
    add("--prior-width", type=positive_int, default=128, help="transformer width")
    add("--prior-layers", type=positive_int, default=3, help="transformer blocks")
    add("--prior-heads", type=positive_int, default=4, help="attention heads (dividing the width)")
    add("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    add("--top-k", type=nonnegative_int, default=0, help="sample among the k likeliest codes (0: all)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    add("--seed", type=nonnegative_int, default=0, help="seeds random, numpy and torch")
    add("--num-samples", type=positive_int, default=100, help="samples, spread evenly over the classes")
    add("--test-limit", type=nonnegative_int, default=0, help="evaluate on the first N test images (0: all)")
    add("--sample-only", action="store_true", help="load --ckpt, then only evaluate and sample")
    add("--ckpt", help="the model.pt that --sample-only loads")
    args = p.parse_args(argv)
    changed = [f"--{k.replace('_', '-')}" for k in MODEL_FLAGS if getattr(args, k) != p.get_default(k)]
    levels = FSQ_LEVELS.get(args.bits) if args.quantizer == "fsq" else ()
    if args.sample_only != bool(args.ckpt) or (args.sample_only and changed):
        p.error(f"--sample-only and --ckpt go together, with no flag that shapes the model ({', '.join(changed)})")
    if args.prior_width % args.prior_heads:
        p.error("--prior-width must be a multiple of --prior-heads")
    if levels is None:
        p.error(f"--quantizer fsq takes --bits in {sorted(FSQ_LEVELS)}")
    if args.prior_epochs and (math.prod(levels) if levels else 2 ** args.bits) > 2 ** FULL_SOFTMAX_MAX_BITS:
        p.error(f"the prior is a softmax over at most {2 ** FULL_SOFTMAX_MAX_BITS:,} codes; use --prior-epochs 0")
    args.levels = list(levels)
    args.out = args.out or str(Path(args.ckpt).parent / "sample_only" if args.sample_only else f"runs/{SCRIPT}")
    return args


def build(config):
    """The tokenizer and (config["prior"]) the prior as one module: weights tokenizer.*, prior.*"""
    c, h, w = config["image_shape"]
    model = nn.ModuleDict({"tokenizer": Tokenizer(config["bits"], config["width"], config["levels"], c)})
    if config["prior"]:
        model["prior"] = TokenPrior(model["tokenizer"].codebook_size, (h // DOWNSAMPLE) * (w // DOWNSAMPLE),
                                    config["num_classes"], config["prior_width"], config["prior_layers"],
                                    config["prior_heads"], levels=config["levels"])
    return model


def run(args):
    device, out = pick_device(args.device), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sample_only and (out / "model.pt").exists():
        raise RunError(f"--out {out} holds a training run's model.pt; --sample-only writes elsewhere")
    seed_everything(args.seed)
    (x_train, y_train), (x_test, y_test) = (load_images(args.data, args.data_dir, s) for s in ("train", "test"))
    x_test, shape = x_test[:args.test_limit or None], list(x_test.shape[1:])  # (C, H, W)
    if shape[1] % DOWNSAMPLE or shape[2] % DOWNSAMPLE:
        raise RunError(f"--data {args.data}: {shape[1]} x {shape[2]} images; lfq.py needs H and W multiples of 4")
    if args.sample_only:
        model, config = load_checkpoint(args.ckpt, build)
        if config["image_shape"] != shape:
            raise RunError(f"{args.ckpt} models images {config['image_shape']}, --data has {shape}")
    elif args.batch_size > len(x_train):
        raise RunError(f"--batch-size {args.batch_size} is larger than the training set ({len(x_train)} images)")
    else:
        model = build(config := {"bits": args.bits, "width": args.width, "levels": args.levels, "image_shape": shape,
                                 "num_classes": 0 if y_train is None else int(y_train.max()) + 1,
                                 "prior": args.prior_epochs > 0, **{k: getattr(args, k) for k in MODEL_FLAGS[3:]}})
    tokenizer, prior = model["tokenizer"].to(device), model["prior"].to(device) if "prior" in model else None
    k = prior.num_classes if prior is not None else 0  # the prior's label: the class, or k = "no label"
    y_train, y_test = (y[:len(x)] if y is not None and k else torch.full((len(x),), k)
                       for x, y in ((x_train, y_train), (x_test, y_test)))
    steps, start = [0, 0], time.time()
    if not args.sample_only:
        steps[0] = train_tokenizer(tokenizer, x_train, args, device)
        if prior is not None:
            steps[1] = train_prior(prior, tokenizer, x_train, y_train, args, device)
        save_checkpoint(out / "model.pt", config, model.state_dict())  # a copy to the host: waits for a GPU
    train_seconds = 0.0 if args.sample_only else round(time.time() - start, 1)
    metrics = evaluate(tokenizer, prior, x_test, y_test, device)[0]
    write_outputs(tokenizer, prior, x_test, args, device, out)
    metrics.update(quantizer="fsq" if tokenizer.levels else "lfq", levels=list(tokenizer.levels or [2] * tokenizer.dim),
                   bits=round(math.log2(tokenizer.codebook_size), 2), train_seconds=train_seconds, steps=sum(steps),
                   steps_stage1=steps[0], steps_stage2=steps[1], device=str(device), test_images=len(x_test))
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (RunError, OSError) as e:
        sys.exit(f"error: {e}")


# ============================================================ appendix: plumbing every script repeats

# --- shared: run utilities ---
class RunError(Exception):
    """An expected failure (missing data, a bad checkpoint, a diverged loss): main() prints
    it as one line `error: ...` on stderr and exits with status 1."""


def checked(kind, ok, rule):
    """An argparse type: kind(text), refused in argparse's one line unless ok(value)."""
    def parse(text):
        if not ok(value := kind(text)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" names the type
    return parse


positive_int = checked(int, lambda v: v > 0, "> 0")
nonnegative_int = checked(int, lambda v: 0 <= v < 2 ** 32, "in [0, 2^32)")
positive_float = checked(float, lambda v: 0 < v < math.inf, "> 0")
fraction = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, then rename it over `path`: a reader,
    or a crash, sees the old file or the new one, never half of one."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_checkpoint(path, config, state):
    atomic_write(path, lambda f: torch.save({"script": SCRIPT, "config": config, "model": state}, f))


def load_checkpoint(path, build):
    """(model, config): build(config) makes the model, whose weights then load strictly.
    A missing, truncated or foreign file ends in one line, whatever failed inside."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # runs no code from the file
        if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
            raise ValueError(f"not written by {SCRIPT}.py")
        model = build(ckpt["config"])
        model.load_state_dict(ckpt["model"], strict=True)
    except Exception as e:  # torch.load alone raises a dozen kinds for a damaged file
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise RunError(f"{path}: not a usable {SCRIPT}.py checkpoint ({why})") from None
    return model, ckpt["config"]


class Progress:
    """`label step/total | terms | items/s | eta`, at most every `every` seconds. Terms may
    be tensors, read (a device sync) only when a line is printed; a non-finite one stops
    the run there, before a diverged model is saved."""

    def __init__(self, total, label="train", every=5.0):
        self.total, self.label, self.every, self.items = total, label, every, 0
        self.start = self.last = time.time()

    def __call__(self, step, items=0, **terms):
        self.items, now = self.items + items, time.time()
        if now - self.last < self.every and step < self.total:
            return
        self.last, elapsed, values = now, now - self.start, {k: float(v) for k, v in terms.items()}
        for k, v in values.items():
            if not math.isfinite(v):
                raise RunError(f"non-finite {k} at {self.label} step {step}; stopped (try a lower --lr)")
        eta = elapsed / max(step, 1) * (self.total - step)
        print(f"{self.label} {step}/{self.total} | " + " ".join(f"{k} {v:.4g}" for k, v in values.items())
              + f" | {self.items / max(elapsed, 1e-9):.0f}/s | eta {eta:.0f}s", flush=True)
# --- end shared ---


# --- shared: image data ---
MNIST = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path):
    """An idx file (MNIST's format): bytes 0 0, type 0x08 (uint8), ndim, ndim big-endian
    sizes, then the data."""
    try:
        raw = gzip.decompress(Path(path).read_bytes())
        zero, kind, ndim = struct.unpack(">HBB", raw[:4])
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    except (OSError, EOFError, zlib.error, struct.error) as e:
        raise RunError(f"{path}: not a gzipped idx file ({e})") from None
    if zero != 0 or kind != 8 or len(raw) != 4 + 4 * ndim + math.prod(shape):
        raise RunError(f"{path}: bad idx header or size; the file is damaged")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_images(data, data_dir, split):
    """(images (N, C, H, W) float32 in [0, 1], labels (N,) int64 or None) for split 'train'
    or 'test'. data is "mnist" (the idx files in data_dir) or a user's .npy array of shape
    (N, H, W) or (N, C, H, W), uint8 or floats in [0, 1], unlabelled: its last tenth is
    held out as the test split."""
    if data == "mnist":
        paths = [Path(data_dir) / name for name in MNIST[split]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise RunError(f"MNIST not found: {', '.join(missing)} (shipped in data/mnist/)")
        images, labels = (read_idx(p) for p in paths)
        return torch.from_numpy(images[:, None] / np.float32(255)), torch.from_numpy(labels.astype(np.int64))
    try:
        x = np.load(data)  # allow_pickle=False: a plain array, never code
        x = x[:, None] if x.ndim == 3 else x
    except (OSError, ValueError, AttributeError) as e:
        raise RunError(f"--data {data}: not a readable .npy array ({e})") from None
    if x.ndim != 4 or len(x) < 2 or x.shape[1] not in (1, 3):
        raise RunError(f"--data {data}: shape {x.shape}; expected (N, H, W) or (N, C, H, W), "
                       "C 1 or 3, N >= 2")
    if x.dtype == np.uint8:
        x = x / np.float32(255)
    elif not (np.issubdtype(x.dtype, np.floating) and x.min() >= 0 and x.max() <= 1):
        raise RunError(f"--data {data}: {x.dtype} values; expected uint8 or floats in [0, 1]")
    n_test = max(1, len(x) // 10)
    x = x[-n_test:] if split == "test" else x[:-n_test]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), None
# --- end shared ---


# --- shared: png writer ---
def write_png(path, pixels):
    """A PNG of uint8 pixels, (H, W) grey or (H, W, 3) RGB: signature, IHDR, one zlib IDAT
    of scanlines each led by filter byte 0, IEND; every chunk length + type + data + CRC32."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0  # 2 = RGB, 0 = grey

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    atomic_write(path, lambda f: f.write(png))


def image_grid(images, ncol, border=2):
    """Tile images (N, C, H, W) in [0, 1], C 1 or 3, into one uint8 picture, grey borders."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0, 1)
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    grid = np.full((border + nrow * (h + border), border + ncol * (w + border), c), 128, np.uint8)
    for i in range(n):
        y, x = border + (i // ncol) * (h + border), border + (i % ncol) * (w + border)
        grid[y:y + h, x:x + w] = (images[i].transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    return grid[:, :, 0] if c == 1 else grid
# --- end shared ---


if __name__ == "__main__":
    main()
