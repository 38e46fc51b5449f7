"""Lookup-free quantisation (LFQ): image tokens made of sign bits, and a prior over them.

A VQ-VAE looks every latent up in a codebook of K learned vectors; the codebook
grows as 2^bits and most entries get sparse gradients, so big vocabularies die.
LFQ (MAGVIT-v2) drops the lookup. Each of the d channels of the latent is
quantised on its own to its sign,

    z = encoder(x)                        # (B, d, h, w), real numbers
    q(z) = sign(z) in {-1, +1}^d          # per latent vector; no codebook parameters
    x_hat = decoder(q(z))                 # straight-through: dq/dz := identity

so a latent vector is a d-bit token and the vocabulary is the 2^d corners of the
cube. Convention used here: bit i is 1 when z_i > 0, and

    index = sum_i 2^i [z_i > 0]           (bit 0 is channel 0, the least significant)

(the lecture's slide writes the indicator the other way round, [z_i <= 0]; that
only relabels the codes, index -> 2^d - 1 - index). sign(0) is taken as -1, in
line with [0 > 0] = 0.

Training objective of stage one, each term returned separately by lfq_loss():

    L = ||x - x_hat||^2 + beta * ||z - sg[q(z)]||^2 + lambda * L_ent
    L_ent = E[H(p(.|z))] - gamma * H(E[p(.|z)]),   p(c|z) = softmax_c(-||z - c||^2 / tau)

over all 2^d codes c. The first entropy term makes each latent pick one code
confidently; the second (the entropy of the batch-averaged assignment) makes the
batch spread over all codes, which is what keeps a huge vocabulary in use.
Defaults beta = 0.25, gamma = 1, tau = 1 and lambda = 1: with the paper's
lambda = 0.1 this small model used only 32% of the 1,024 codes after 400 steps
(lambda = 1: 99.5%, and a lower test MSE too); with tau = 0.3 and lambda = 0.1
it collapsed onto 2 codes.
Because ||z - c||^2 = sum_i (z_i - c_i)^2, the softmax over codes is a product of
d independent per-bit softmaxes. So the per-sample entropy is exactly a sum of d
binary entropies, but the batch entropy is not a sum over bits: summing the batch
entropies of groups of bits gives an upper bound on it (sum of marginal entropies
>= joint entropy), and the bound has blind spots. Measured at d = 16 (65,536 codes,
3 epochs, stage one only; test set):

  --entropy per-bit  (16 groups of 1 bit)    139 codes used,  perplexity 2.0,    MSE 0.052
      sixteen identical bits max every marginal out with only 2 codes (5 epochs);
  --entropy groups   (2 groups of 8 bits, like MAGVIT-v2's sub-codebooks)
                                             8,569 codes (13%), perplexity 1,331, MSE 0.011
      each half is near uniform, but the halves stay correlated;
  --entropy exact    (all 65,536 codes)      60,877 codes (93%), perplexity 33,056, MSE 0.0073

The exact form needs the batch-averaged assignment at each of the 2^d codes, but
never the (N, 2^d) table of assignments: split the bits into two halves, and
p(c|z) = p(c_low|z_low) p(c_high|z_high), so the batch average is one matrix
product P_low^T P_high / N of two (N, 2^(d/2)) tables -- at d = 16 two 256-column
tables, 48 ms forward and backward for a batch of 6,272 tokens on a 2-core CPU
(batch_entropy). `--entropy exact` is the default up to d = 16, groups of <= 8
bits above. For comparison, vqvae.py with K = 65,536 codes of the same size D = 16
uses 94% of them too, but only because its dead-code restart re-seeds codes
(2.1 million restarts in those 3 epochs), and its N x K nearest-code search makes
the same 3 epochs take 31 minutes instead of 2: the lookup grows with K, the sign
with d.

`--quantizer fsq` swaps in the sibling, finite scalar quantisation (Mentzer et al.
2023): a few channels, each bounded by tanh and rounded to one of L_i levels, with
no entropy or commitment term; with the paper's levels, 8,5,5,5 = 1,000 codes stand
in for 2^10 and 8,8,8,5,5,5 = 64,000 for 2^16. Side by side (test set, same epochs):

  1,000 codes  FSQ 8,5,5,5:   MSE 0.0026, 98% used, perplexity   189, prior 157 bits/image
  1,024 codes  LFQ d = 10:    MSE 0.0084, 100% used, perplexity  832, prior  87 bits/image
  64,000 codes FSQ 8,8,8,5,5,5: MSE 0.0039, 9% used, perplexity    379   (3 epochs, stage one)
  65,536 codes LFQ d = 16:    MSE 0.0073, 93% used, perplexity 33,056

FSQ reconstructs better (a finer grid in fewer dimensions), but with no entropy term
it leaves most of a large vocabulary unused and uses the rest unevenly; LFQ's entropy
loss spreads its tokens. FSQ's tokens also carry more detail, so its prior needs more
bits per image: a different point on the rate-distortion curve, not a free win.

Stage two is a class-conditional autoregressive prior: a small causal
transformer over the h*w tokens in raster order, p(t_1..t_T | y) = prod_t
p(t_t | t_<t, y). Its input embeds a token from its d bits (a Linear layer, so
no 2^d-row table); its output is a softmax over 2^d codes for d <= 12, or d
independent Bernoulli bits for bigger vocabularies (a factorised output head).
Sampling tokens and decoding them gives samples.png.

Shape legend: B batch, d bits per token (channels of z), h w token grid (7 x 7),
T = h*w tokens per image, K = 2^d codes, D transformer width.

Run:   python lfq.py                          (d = 10, about 9 minutes on a 2-core CPU)
       python lfq.py --bits 16 --epochs 3 --prior-epochs 0 --out runs/lfq_d16  (stage one only)
       python lfq.py --quantizer fsq --out runs/fsq      (FSQ, 1,000 codes, side by side)
       python lfq.py --sample-only --ckpt runs/lfq/model.pt
Writes runs/lfq/: recon.png, samples.png, samples.npy, model.pt, metrics.json
(test_recon_mse, codebook_usage, codebook_perplexity, bits_per_image,
test_prior_nll_bits, ...). Measured default run (2-core AMD EPYC CPU, 9m17s wall):
test MSE 0.0084, all 1,024 codes used on the test set (perplexity 832 codes), 490
bits per image as tokens, prior 86.7 bits per test image; samples read as digits.
The d = 16 run above: 2m02s wall, 93% of the 65,536 codes used.

References: Yu et al. (2024), "Language Model Beats Diffusion -- Tokenizer is Key
to Visual Generation" (MAGVIT-v2, LFQ and its entropy loss); van den Oord et al.
(2017) for the two-stage tokenizer + prior recipe.
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
FULL_SOFTMAX_MAX_BITS = 12  # prior output: softmax over 2^d up to here, per-bit above
EXACT_ENTROPY_MAX_BITS = 16  # entropy loss: exact over all 2^d codes up to here, groups above


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
    """Call write(f) on a temporary file, then rename it over `path`.

    os.replace is atomic, so a reader (or a crash) sees the old file or the new
    one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    return ckpt


def write_metrics(path, metrics):
    atomic_write(path, lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))


def check_finite(step, **terms):
    """Stop on a NaN/inf loss before it reaches the weights on disk."""
    for name, value in terms.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise RunError(f"non-finite {name} at step {step}; stopped, model.pt left as it was "
                           "(try a lower --lr)")


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
def png_bytes(pixels):
    """Encode a uint8 array (H, W) grey or (H, W, 3) RGB as a PNG file's bytes."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0  # 2 = RGB, 0 = greyscale
    # Each scanline starts with its filter type; 0 = none.
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)  # 8-bit, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_png(path, pixels):
    atomic_write(path, lambda f: f.write(png_bytes(pixels)))


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


# ----------------------------------------------------------------------------- data

def mnist_tensors(data_dir, split):
    """Images as float (N, 1, 28, 28) in [0, 1], and labels (N,)."""
    images, labels = load_mnist(data_dir, split)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels)


# ----------------------------------------------------------------------------- quantiser

def quantize(z):
    """q(z) = sign(z) in {-1, +1} with a straight-through gradient.

    sign(z) + (z - sg[z]) has the value sign(z) *exactly* (z - z is exactly 0 in
    floating point) and the gradient of the identity, so the decoder sees pure
    +-1 codes while the encoder gets the gradient that arrived at q(z)."""
    s = torch.where(z > 0, 1.0, -1.0).to(z.dtype)  # sign with sign(0) := -1, as [0 > 0] = 0
    return s + (z - z.detach())


def code_to_index(codes):
    """index = sum_i 2^i [c_i > 0] for codes (..., d) -> (...) int64."""
    d = codes.shape[-1]
    powers = 2 ** torch.arange(d, device=codes.device)  # (d,): 1, 2, 4, ...
    return ((codes > 0).long() * powers).sum(-1)


def index_to_code(index, d):
    """The inverse: bit i of index -> +1 if set else -1. (...) -> (..., d) float."""
    bits = (index.unsqueeze(-1) >> torch.arange(d, device=index.device)) & 1
    return bits.float() * 2 - 1


# FSQ, the sibling (--quantizer fsq; Mentzer et al. 2023, "Finite Scalar Quantization:
# VQ-VAE Made Simple"): each channel of z is bounded and rounded to one of L_i levels
# instead of to its sign, so the vocabulary is prod_i L_i. Like LFQ there is no codebook
# and no lookup; unlike LFQ there is no entropy or commitment term: the paper reports
# that rounding a bounded value onto a small fixed grid keeps the grid in use by itself.
# Levels the paper recommends for about 2^bits codes (its table 1):
FSQ_LEVELS = {8: (8, 6, 5), 10: (8, 5, 5, 5), 12: (7, 5, 5, 5, 5), 14: (8, 8, 8, 6, 5),
              16: (8, 8, 8, 5, 5, 5)}


def fsq_quantize(z, levels):
    """z (B, d, h, w) -> codes (B, d, h, w): channel i on L_i levels in [-1, 1].

    bound(z) = tanh(z + shift) (L - 1)(1 - eps) / 2 - offset  lies just inside the
    range of the integers -floor(L/2) .. ceil(L/2) - 1 (offset = 1/2 for even L, whose
    grid is not symmetric; shift = atanh(offset / half) makes bound(0) = 0); it is
    rounded with a straight-through gradient (the gradient of bound) and divided by
    floor(L/2). The paper's code takes tan for the shift; atanh is the exact inverse."""
    L = torch.tensor(levels, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
    half = (L - 1) * (1 - 1e-3) / 2
    offset = 0.5 * (L % 2 == 0)
    bounded = torch.tanh(z + torch.atanh(offset / half)) * half - offset
    rounded = bounded + (torch.round(bounded) - bounded).detach()  # value round(b), gradient of b
    return rounded / (L // 2)


def fsq_code_to_index(codes, levels):
    """index = sum_i k_i prod_{j<i} L_j with digit k_i = code_i floor(L_i/2) + floor(L_i/2)
    in 0 .. L_i - 1 (channel 0 least significant, as for LFQ's bits). (..., d) -> (...)"""
    L = torch.tensor(levels, device=codes.device)
    digits = torch.round(codes * (L // 2)).long() + L // 2
    basis = torch.cumprod(torch.cat([L.new_ones(1), L[:-1]]), 0)  # 1, L_0, L_0 L_1, ...
    return (digits * basis).sum(-1)


def fsq_index_to_code(index, levels):
    """The inverse: digit k_i = (index // prod_{j<i} L_j) mod L_i -> code. (...) -> (..., d)"""
    L = torch.tensor(levels, device=index.device)
    basis = torch.cumprod(torch.cat([L.new_ones(1), L[:-1]]), 0)
    digits = index.unsqueeze(-1) // basis % L
    return (digits - L // 2).float() / (L // 2)


def code_probs(z, tau):
    """p(c|z) = softmax_c(-||z - c||^2 / tau) over the 2^g codes of g bits: (N, g) -> (N, 2^g).

    -||z - c||^2 / tau = (2 z.c - ||z||^2 - ||c||^2) / tau, and ||z||^2 and ||c||^2 = g
    are the same for every code c, so they cancel in the softmax: logits 2 z.c / tau."""
    g = z.shape[1]
    codes = index_to_code(torch.arange(2 ** g, device=z.device), g).to(z.dtype)  # (2^g, g)
    return F.softmax(2 * z @ codes.T / tau, dim=-1)


def batch_entropy(z, tau):
    """H(E_z[p(.|z)]) in nats, over all 2^g codes of the g bits of z (N, g).

    Because the distance is a sum over bits, p(c|z) = p(c_low|z_low) p(c_high|z_high)
    for any split of the bits. So the batch-averaged assignment over all 2^g codes is
    one matrix product of the two halves' assignments,
        E_z[p(c_low, c_high|z)] = P_low^T P_high / N,     (2^(g/2), N) @ (N, 2^(g/2)),
    and the (N, 2^g) table is never built: N * 2^g multiply-adds in one GEMM, memory
    N * 2^(g/2) + 2^g. Exact at d = 16 (a 256 x 256 table) for a whole batch."""
    n, g = z.shape
    if g <= 8:
        p_avg = code_probs(z, tau).mean(0)                                   # (2^g,)
    else:
        h = g // 2
        p_avg = code_probs(z[:, :h], tau).T @ code_probs(z[:, h:], tau) / n  # (2^h, 2^(g-h))
    return -(p_avg * p_avg.clamp_min(1e-30).log()).sum()


def entropy_terms(z, tau, group_bits):
    """Per-sample and batch entropy (nats) of p(c|z) = softmax_c(-||z - c||^2 / tau).

    z: (N, d) latent vectors. The softmax over the 2^d codes factorises over bits:
    bit i is +1 with probability sigmoid(l_i), l_i = 4 z_i / tau (the logit gap between
    c_i = +1 and c_i = -1), independently of the other bits. Hence the per-sample
    entropy is exactly the sum of d binary entropies, H(sigmoid(l)) = softplus(l) -
    l sigmoid(l), for every form of the loss. The batch entropy is not a sum over
    bits: the d bits are split into d / group_bits groups, each with its own exact
    batch entropy, and the sum over groups is an upper bound on the joint entropy
    (sum of marginal entropies >= joint) -- tight for group_bits = d (the exact
    form), loosest for group_bits = 1 (the per-bit form).
    Returns (E_z[H(p(.|z))], H(E_z[p(.|z)])), the latter summed over groups."""
    n, d = z.shape
    if d % group_bits:
        raise ValueError(f"group_bits {group_bits} does not divide d = {d}")
    l = 4 * z / tau                                                          # (N, d)
    per_sample = (F.softplus(l) - l * torch.sigmoid(l)).sum(1).mean()       # E[H(p(.|z))]
    batch = sum(batch_entropy(z[:, i:i + group_bits], tau) for i in range(0, d, group_bits))
    return per_sample, batch


# ----------------------------------------------------------------------------- model

class Tokenizer(nn.Module):
    """Conv encoder 28 -> 14 -> 7 to z (B, d, 7, 7), LFQ (or FSQ), and the mirror decoder.

    levels=None: LFQ, d = bits sign bits, 2^d codes. levels=(L_1, ..): FSQ, d = len(levels)
    channels, prod L_i codes."""

    def __init__(self, bits=10, width=64, levels=None):
        super().__init__()
        c1, c2 = width // 2, width
        self.levels = tuple(levels) if levels else None
        self.dim = len(self.levels) if self.levels else bits              # d, channels of z
        self.codebook_size = math.prod(self.levels) if self.levels else 2 ** bits
        d = self.dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, 2, 1), nn.ReLU(),               # (B, c1, 14, 14)
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),              # (B, c2, 7, 7)
            nn.Conv2d(c2, c2, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(c2, d, 1),                                # (B, d, 7, 7) = z
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(d, c2, 3, 1, 1), nn.ReLU(),               # (B, c2, 7, 7)
            nn.Conv2d(c2, c2, 3, 1, 1), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),     # (B, c1, 14, 14)
            nn.ConvTranspose2d(c1, 1, 4, 2, 1),                 # (B, 1, 28, 28)
        )
        # Linear output, clamped to [0, 1] only when shown or scored: a sigmoid
        # would flatten the MSE gradient on the many pure-black pixels.

    def quantize(self, z):
        """q(z) (B, d, h, w) with straight-through gradients: sign(z) for LFQ, FSQ's rounding."""
        return quantize(z) if self.levels is None else fsq_quantize(z, self.levels)

    def to_index(self, codes):
        """Codes (..., d) -> token indices (...)."""
        return code_to_index(codes) if self.levels is None else fsq_code_to_index(codes, self.levels)

    def to_code(self, index):
        """Token indices (...) -> codes (..., d)."""
        return index_to_code(index, self.dim) if self.levels is None else fsq_index_to_code(index, self.levels)

    def forward(self, x):
        z = self.encoder(x)                    # (B, d, h, w)
        q = self.quantize(z)                   # (B, d, h, w), exactly +-1 for LFQ
        return self.decoder(q), z, q

    def tokens(self, x):
        """Token indices (B, T) of images x, raster order."""
        q = self.quantize(self.encoder(x))
        return self.to_index(q.flatten(2).transpose(1, 2))  # (B, T)

    def decode_tokens(self, index, h=7, w=7):
        """Images in [0, 1] from token indices (B, T)."""
        q = self.to_code(index).transpose(1, 2)  # (B, d, T)
        return self.decoder(q.reshape(len(index), self.dim, h, w)).clamp(0, 1)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h):
        b, t, dim = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, dim // self.heads).unbind(2)
        # is_causal: position t attends to positions <= t only.
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)  # (B, heads, T, D / heads)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, dim))
        return h + self.mlp(self.ln2(h))


class Prior(nn.Module):
    """Class-conditional causal transformer p(t_i | t_<i, y) over T tokens of d bits.

    Input at position i is the previous token t_{i-1} (zeros at i = 0), embedded
    from its +-1 bits, plus a position and a class embedding: so the output at i
    sees t_<i and y only. Output head "softmax": logits over K = 2^d codes; head
    "bits": d Bernoulli logits, p(t_i | .) = prod_j p(bit_j | .) (a factorised
    head whose size is linear in d). With FSQ levels the tokens are FSQ codes
    (d = len(levels) numbers in [-1, 1]) and the head is the softmax over prod L_i."""

    def __init__(self, bits, n_tokens=49, n_classes=10, dim=128, layers=3, heads=4, head="auto",
                 levels=None):
        super().__init__()
        self.levels = tuple(levels) if levels else None
        self.d = len(self.levels) if self.levels else bits             # numbers per token
        size = math.prod(self.levels) if self.levels else 2 ** bits     # K
        if head == "auto":
            head = "softmax" if size <= 2 ** FULL_SOFTMAX_MAX_BITS else "bits"
        if head == "bits" and self.levels:
            raise ValueError("the factorised bits head is for LFQ tokens; FSQ needs the softmax head")
        self.head_kind = head
        self.embed = nn.Linear(self.d, dim)
        self.pos = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.cls = nn.Embedding(n_classes, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, size if self.head_kind == "softmax" else self.d)

    def to_code(self, index):
        """Token indices (...) -> codes (..., d)."""
        return index_to_code(index, self.d) if self.levels is None else fsq_index_to_code(index, self.levels)

    def forward(self, codes, y):
        """codes (B, T, d) in {-1, +1}, labels y (B,) -> logits (B, T, K or d)."""
        e = self.embed(codes)                                          # (B, T, D)
        e = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], 1)      # shift: i sees t_<i
        h = e + self.pos[:e.shape[1]] + self.cls(y)[:, None]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))

    def nll(self, index, y):
        """-log p(tokens | y) per image in nats, (B,), for token indices (B, T)."""
        codes = self.to_code(index)                                    # (B, T, d)
        logits = self(codes, y)
        if self.head_kind == "softmax":
            return F.cross_entropy(logits.transpose(1, 2), index, reduction="none").sum(1)
        return F.binary_cross_entropy_with_logits(logits, (codes > 0).float(),
                                                  reduction="none").sum((1, 2))

    @torch.no_grad()
    def sample(self, y, n_tokens, temperature=1.0, generator=None):
        """Ancestral sampling, one token at a time: (B,) labels -> indices (B, T)."""
        codes = torch.zeros(len(y), n_tokens, self.d, device=y.device)
        index = torch.zeros(len(y), n_tokens, dtype=torch.long, device=y.device)
        for i in range(n_tokens):
            logits = self(codes[:, :i + 1], y)[:, i] / temperature      # (B, K or d)
            if self.head_kind == "softmax":
                index[:, i] = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            else:
                u = torch.rand(logits.shape, generator=generator, device=y.device)
                index[:, i] = code_to_index(torch.where(u < logits.sigmoid(), 1.0, -1.0))
            codes[:, i] = self.to_code(index[:, i])
        return index


# ----------------------------------------------------------------------------- objective

def lfq_loss(x_hat, x, z, q, tau=1.0, gamma=1.0, group_bits=None):
    """Every term of the stage-one loss, separately (means, so scales do not depend on B).

    recon  = mean (x_hat - x)^2 per pixel
    commit = mean (z - sg[q(z)])^2 per latent dimension
    per_sample, batch = E[H(p(.|z))], H(E[p(.|z)]) in nats per token
    entropy = per_sample - gamma * batch"""
    d = z.shape[1]
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, d): one row per token
    per_sample, batch = entropy_terms(z_flat, tau, group_bits or d)
    return {"recon": (x_hat - x).pow(2).mean(),
            "commit": (z - q.detach()).pow(2).mean(),
            "per_sample": per_sample, "batch": batch,
            "entropy": per_sample - gamma * batch}


# ----------------------------------------------------------------------------- train / evaluate / sample

def entropy_group_bits(args):
    """Bits per softmax group of L_ent: d (exact), 1 (per-bit) or a group size in between."""
    if args.entropy == "exact" or (args.entropy == "auto" and args.bits <= EXACT_ENTROPY_MAX_BITS):
        return args.bits
    if args.entropy == "per-bit":
        return 1
    # groups: exact within groups of the largest divisor of d that is <= 8 bits
    return max(g for g in range(1, 9) if args.bits % g == 0)


def cosine_schedule(opt, total):
    """lr * 0.5 (1 + cos(pi step / total)): short runs end at a low lr, and settle."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1))))


def train_tokenizer(model, x_train, args, device):
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = max(1, len(x_train) // args.batch_size)
    total = args.epochs * steps_per_epoch
    if args.steps:
        total = min(total, args.steps)
    sched = cosine_schedule(opt, total)
    progress, step, group = Progress(total, label="stage 1"), 0, entropy_group_bits(args)
    while step < total:
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(steps_per_epoch):
            if step == total:
                break
            xb = x_train[order[i * args.batch_size:(i + 1) * args.batch_size]].to(device)
            x_hat, z, q = model(xb)
            if model.levels is None:
                t = lfq_loss(x_hat, xb, z, q, args.tau, args.gamma, group)
                loss = t["recon"] + args.commit_weight * t["commit"] + args.entropy_weight * t["entropy"]
            else:  # FSQ: the reconstruction is the whole loss
                t = {"recon": (x_hat - xb).pow(2).mean()}
                loss = t["recon"]
            check_finite(step, loss=loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            progress.update(step, len(xb), **{k: v.item() for k, v in t.items() if k != "entropy"})
    return step


def train_prior(prior, tokens, labels, args, device):
    opt = torch.optim.AdamW(prior.parameters(), lr=args.prior_lr, weight_decay=0.01)
    steps_per_epoch = max(1, len(tokens) // args.batch_size)
    total = args.prior_epochs * steps_per_epoch
    if args.steps:
        total = min(total, args.steps)
    sched = cosine_schedule(opt, total)
    progress, step = Progress(total, label="stage 2"), 0
    while step < total:
        prior.train()
        order = torch.randperm(len(tokens))
        for i in range(steps_per_epoch):
            if step == total:
                break
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            nll = prior.nll(tokens[idx].to(device), labels[idx].to(device)).mean()
            check_finite(step, prior_nll=nll)
            opt.zero_grad(set_to_none=True)
            nll.backward()
            opt.step()
            sched.step()
            step += 1
            progress.update(step, len(idx), bits_per_image=nll.item() / math.log(2))
    return step


@torch.no_grad()
def encode_tokens(model, x, device, batch_size=1000):
    model.eval()
    return torch.cat([model.tokens(x[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate_tokenizer(model, x, device, batch_size=1000):
    """Test MSE per pixel, and how the test tokens use the 2^d codes: the fraction of
    codes used at least once, and the perplexity exp(H(counts / N)) in codes."""
    model.eval()
    se, tokens = 0.0, []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        q = model.quantize(model.encoder(xb))
        x_hat = model.decoder(q).clamp(0, 1)
        se += (x_hat - xb).pow(2).sum().item()
        tokens.append(model.to_index(q.flatten(2).transpose(1, 2)).cpu())
    tokens = torch.cat(tokens)  # (N, T)
    counts = torch.bincount(tokens.flatten(), minlength=model.codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    return {"test_recon_mse": se / x.numel(),
            "codebook_usage": (counts > 0).double().mean().item(),
            "codes_used": int((counts > 0).sum()),
            "codebook_size": model.codebook_size,
            "codebook_perplexity": math.exp(-(p * p.log()).sum().item()),
            "bits_per_image": round(tokens.shape[1] * math.log2(model.codebook_size), 2)}, tokens


@torch.no_grad()
def evaluate_prior(prior, tokens, labels, device, batch_size=1000):
    """Mean -log2 p(tokens | y) per test image, in bits."""
    prior.eval()
    total = sum(prior.nll(tokens[i:i + batch_size].to(device), labels[i:i + batch_size].to(device))
                .sum().item() for i in range(0, len(tokens), batch_size))
    return total / len(tokens) / math.log(2)


def write_outputs(model, prior, x_test, args, device, out):
    model.eval()
    with torch.no_grad():
        # recon.png: rows of 16 test digits, each row followed by its reconstruction.
        ncol = min(16, len(x_test))
        x = x_test[:64 // ncol * ncol]
        x_hat = model.decoder(model.quantize(model.encoder(x.to(device)))).clamp(0, 1).cpu()
        rows = torch.stack([x.view(-1, ncol, 1, 28, 28), x_hat.view(-1, ncol, 1, 28, 28)], 1)
        write_png(out / "recon.png", image_grid(rows.reshape(-1, 1, 28, 28), ncol=ncol))
        if prior is None:
            return
        # samples.png: column j holds digits of class j (labels 0..9 repeated).
        y = torch.arange(args.num_samples, device=device) % 10
        gen = torch.Generator(device=device).manual_seed(args.seed)
        index = prior.sample(y, 49, args.temperature, generator=gen)
        samples = model.decode_tokens(index).cpu()
    atomic_write(out / "samples.npy", lambda f: np.save(f, samples.numpy()))  # (N, 1, 28, 28) in [0, 1]
    write_png(out / "samples.png", image_grid(samples, ncol=min(args.num_samples, 10)))


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE / "data" / "mnist"),
                   help="folder with the four MNIST idx .gz files (downloaded if missing)")
    p.add_argument("--out", default=f"runs/{SCRIPT}", help="output folder")
    p.add_argument("--bits", type=int, default=10, help="d, bits per token: vocabulary 2^d")
    p.add_argument("--quantizer", choices=["lfq", "fsq"], default="lfq",
                   help="lfq: sign bits; fsq: finite scalar quantisation, the sibling, with "
                   "the paper's levels for about 2^bits codes (or --levels)")
    p.add_argument("--levels", help="FSQ levels per channel, e.g. 8,5,5,5 (1,000 codes)")
    p.add_argument("--epochs", type=int, default=5, help="stage one (tokenizer) epochs")
    p.add_argument("--prior-epochs", type=int, default=3, help="stage two (prior) epochs; 0 skips it")
    p.add_argument("--steps", type=int, default=0, help="cap on optimizer steps of each stage (0: no cap)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="stage one learning rate")
    p.add_argument("--prior-lr", type=float, default=2e-3, help="stage two learning rate")
    p.add_argument("--width", type=int, default=64, help="channels of the conv layers at 7 x 7")
    p.add_argument("--tau", type=float, default=1.0, help="temperature of the soft assignment")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of the batch entropy inside L_ent")
    p.add_argument("--entropy-weight", type=float, default=1.0,
                   help="lambda, weight of L_ent (MAGVIT-v2 used 0.1; see the docstring)")
    p.add_argument("--commit-weight", type=float, default=0.25, help="beta, weight of the commitment")
    p.add_argument("--entropy", choices=["auto", "exact", "groups", "per-bit"], default="auto",
                   help=f"form of L_ent; auto: exact for d <= {EXACT_ENTROPY_MAX_BITS}, else groups "
                   "(exact within groups of <= 8 bits)")
    p.add_argument("--prior-dim", type=int, default=128, help="transformer width D")
    p.add_argument("--prior-layers", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the prior")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on the first N test images only (0: all 10,000)")
    p.add_argument("--sample-only", action="store_true",
                   help="skip training: load --ckpt, evaluate and sample")
    p.add_argument("--ckpt", help="checkpoint to load with --sample-only")
    args = p.parse_args(argv)
    if args.sample_only and not args.ckpt:
        p.error("--sample-only needs --ckpt PATH")
    if not 1 <= args.bits <= 24:
        p.error("--bits must be between 1 and 24")
    if args.entropy == "exact" and args.bits > 20:
        p.error("--entropy exact builds a 2^d table of the batch's assignment; "
                "use groups or per-bit for d > 20")
    for flag in ("epochs", "batch_size", "width", "num_samples", "prior_dim", "prior_layers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.levels and args.quantizer != "fsq":
        p.error("--levels is for --quantizer fsq")
    if args.quantizer == "fsq":
        try:
            levels = [int(v) for v in args.levels.split(",")] if args.levels else FSQ_LEVELS[args.bits]
        except (KeyError, ValueError):
            p.error("--quantizer fsq needs --levels L1,L2,... (integers) or --bits in "
                    f"{sorted(FSQ_LEVELS)}")
        if min(levels) < 3:
            p.error("FSQ levels must be at least 3 (2 levels is LFQ's sign)")
        if args.prior_epochs and math.prod(levels) > 2 ** FULL_SOFTMAX_MAX_BITS:
            p.error(f"the prior over FSQ tokens is a softmax over all codes, at most "
                    f"{2 ** FULL_SOFTMAX_MAX_BITS:,}; use --prior-epochs 0")
    if args.prior_dim % 4:
        p.error("--prior-dim must be a multiple of 4 (the number of attention heads)")
    if args.steps < 0 or args.test_limit < 0 or args.prior_epochs < 0:
        p.error("--steps, --test-limit and --prior-epochs must be >= 0")
    if min(args.tau, args.temperature, args.lr, args.prior_lr) <= 0:
        p.error("--tau, --temperature, --lr and --prior-lr must be positive")
    return args


def fsq_levels(cfg):
    """The FSQ levels a config asks for, or None for LFQ."""
    if cfg.get("quantizer", "lfq") != "fsq":
        return None
    return tuple(int(v) for v in cfg["levels"].split(",")) if cfg.get("levels") else FSQ_LEVELS[cfg["bits"]]


def build(cfg, device):
    levels = fsq_levels(cfg)
    model = Tokenizer(cfg["bits"], cfg["width"], levels).to(device)
    prior = (Prior(cfg["bits"], dim=cfg["prior_dim"], layers=cfg["prior_layers"], levels=levels).to(device)
             if cfg["prior_epochs"] > 0 else None)
    return model, prior


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_test, y_test = mnist_tensors(args.data_dir, "test")
    x_test, y_test = x_test[:args.test_limit or None], y_test[:args.test_limit or None]
    if args.sample_only:
        ckpt = load_checkpoint(args.ckpt)
        cfg = ckpt["config"]
        model, prior = build(cfg, device)
        try:
            model.load_state_dict(ckpt["model"]["tokenizer"])
            if prior is not None:
                prior.load_state_dict(ckpt["model"]["prior"])
        except (KeyError, RuntimeError) as e:
            raise RunError(f"{args.ckpt} does not match its config ({type(e).__name__})") from None
        steps, train_seconds = [0, 0], 0.0
    else:
        x_train, y_train = mnist_tensors(args.data_dir, "train")
        model, prior = build(vars(args), device)
        start = time.time()
        steps = [train_tokenizer(model, x_train, args, device), 0]
        if prior is not None:
            tokens = encode_tokens(model, x_train, device)  # (N, T): the prior's training data
            steps[1] = train_prior(prior, tokens, y_train, args, device)
        train_seconds = time.time() - start
        state = {"tokenizer": model.state_dict()}
        if prior is not None:
            state["prior"] = prior.state_dict()
        save_checkpoint(out / "model.pt", state, vars(args))
    metrics, test_tokens = evaluate_tokenizer(model, x_test, device)
    if prior is not None:
        metrics["test_prior_nll_bits"] = evaluate_prior(prior, test_tokens, y_test, device)
        metrics["prior_head"] = prior.head_kind
    write_outputs(model, prior, x_test, args, device, out)
    metrics.update(quantizer="fsq" if model.levels else "lfq", levels=list(model.levels or [2] * model.dim),
                   bits=round(math.log2(model.codebook_size), 2), train_seconds=round(train_seconds, 1), steps_stage1=steps[0],
                   steps_stage2=steps[1], device=str(device), test_images=len(x_test))
    if not args.sample_only:
        write_metrics(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
