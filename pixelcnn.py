"""Gated PixelCNN: exact likelihoods from masked convolutions, and images coded into bits.

An autoregressive model factorises an image over its pixels in raster order,

    log p(x | y) = sum_t log p(x_t | x_1 .. x_{t-1}, y),       t = 1 .. H*W,

each factor a softmax over the L = 2 values of a binarised pixel (drawn ~ Bernoulli(its
grey level)), y the class label (the digit; none with --unconditional or unlabelled data).
Masked convolutions let the output at t see only pixels before t: mask A in the first
layer (x_t itself excluded), mask B after it. A vertical stack sees the rows above, a
horizontal stack the pixels to the left plus the vertical stack (no blind spot), through
gated units y = tanh(W_f * x + V_f h) . sigmoid(W_g * x + V_g h). One pass gives all H*W
factors, so training and the test NLL = -log p(x | y) are exact (nats per image; bits/dim
= NLL / (H W ln 2); the test set is binarised once with a fixed seed, training batches
afresh each time); sampling takes a pass per pixel. Generation = compression: an
arithmetic coder driven by p(x_t | x_<t) writes an image in about -log2 p(x) bits.

Papers: van den Oord et al. 2016, "Pixel Recurrent Neural Networks" and "Conditional Image
Generation with PixelCNN Decoders"; Witten, Neal & Cleary 1987 (arithmetic coding).
Shape legend: B batch, C channels (1: grey), H W height width, L levels (softmax classes).

Run:   python pixelcnn.py [--data my_images.npy]    (grey images (N, H, W): unconditional)
       python pixelcnn.py --sample-only --ckpt runs/pixelcnn/model.pt --num-samples 500
       python pixelcnn.py --compress --ckpt runs/pixelcnn/model.pt   (-> runs/pixelcnn/compress/)
       python pixelcnn.py --decompress runs/pixelcnn/compress/test_images.pxc --ckpt ... --image-range 0:100
A default run (class-conditional MNIST, ~10 min on 2 CPU cores) writes runs/pixelcnn/: model.pt,
metrics.json (the test NLL), samples.npy, sample_labels.npy, samples.png (a row per digit).
"""

import argparse
import contextlib
import copy
import gzip
import hashlib
import json
import math
import os
import platform
import random
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "pixelcnn"


# ============================================================================ the model

class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only pixels allowed by the raster order.

    A plain PixelCNN zeroes half of a k x k kernel. Here each stack's kernel is
    cut to the allowed half already, p = k // 2 (no multiply-adds wasted on zeros):
      vertical   ("v"): rows i-p .. i,  columns j-p .. j+p   kernel (p+1, 2p+1)
      horizontal ("h"): row i,          columns j-p .. j     kernel (1, p+1)
    and the mask only decides the centre:
      mask A (first layer) zeroes it -- the current row for the vertical stack,
             the current pixel for the horizontal one -- so output t never sees x_t;
      mask B (later layers) keeps it: feature t already excludes x_t."""

    def __init__(self, c_in, c_out, stack, p, mask):
        kernel = (p + 1, 2 * p + 1) if stack == "v" else (1, p + 1)
        super().__init__(c_in, c_out, kernel)
        self.pad = (p, p, p, 0) if stack == "v" else (p, 0, 0, 0)  # (left, right, top, bottom): allowed sides
        m = torch.ones(kernel)
        if mask == "A" and stack == "v":
            m[-1, :] = 0   # drop the current row
        elif mask == "A":
            m[0, -1] = 0   # drop the current pixel
        self.register_buffer("mask", m)

    def forward(self, x):
        return F.conv2d(F.pad(x, self.pad), self.weight * self.mask, self.bias)


def gate(a):
    """Gated activation tanh(a_f) * sigmoid(a_g) over the two halves of the channels."""
    a_f, a_g = a.chunk(2, dim=1)
    return torch.tanh(a_f) * torch.sigmoid(a_g)


class GatedLayer(nn.Module):
    """One layer of both stacks (van den Oord et al. 2016, figure 2).

      v_pre = W_v * v + V_v y                        (rows above only)
      h_pre = W_h * h + W_link v_pre + V_h y         (pixels to the left + all above)
      v'    = gate(v_pre)
      h'    = h + W_out gate(h_pre)     (residual in mask-B layers: added once)

    The link v_pre -> h is safe: the vertical stack never sees the current row."""

    def __init__(self, c_in, channels, p, mask, num_classes):
        super().__init__()
        self.v_conv = MaskedConv2d(c_in, 2 * channels, "v", p, mask)
        self.h_conv = MaskedConv2d(c_in, 2 * channels, "h", p, mask)
        self.link = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.residual = mask == "B"
        # The label's bias V y for both stacks' pre-activations: 2C + 2C numbers.
        # Zero at first, so the conditional model starts as the unconditional one:
        # nn.Embedding's default N(0, 1) rows would shift every gate by ~1 at random
        # and cost more early on than the label (at most ln 10 = 2.3 nats) is worth.
        self.embed = nn.Embedding(num_classes, 4 * channels) if num_classes else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)

    def forward(self, v, h, y):
        v_pre = self.v_conv(v)                        # (B, 2C, H, W)
        h_pre = self.h_conv(h) + self.link(v_pre[:, :, -h.shape[2]:])  # (B, 2C, H_h, W): h may be the last row
        if self.embed is not None:
            cond_v, cond_h = self.embed(y)[:, :, None, None].chunk(2, dim=1)  # (B, 2C, 1, 1)
            v_pre, h_pre = v_pre + cond_v, h_pre + cond_h
        h_new = self.h_out(gate(h_pre))               # (B, C, H, W)
        return gate(v_pre), (h + h_new if self.residual else h_new)


class GatedPixelCNN(nn.Module):
    """Pixels x (B, 1, H, W) in 0 .. L-1, labels (B,) -> logits (B, L, 1, H, W) of p(x_t | x_<t, y).

    First layer: mask A, kernel `first_kernel` (7 as in the PixelCNN paper: a wide first
    look is cheap on one input channel); then layers-1 mask-B layers of `kernel`; then a
    1x1 ReLU head. Fully convolutional; image_shape (1, H, W) is the size it samples."""

    def __init__(self, image_shape=(1, 28, 28), levels=2, channels=32, layers=8, kernel=3,
                 first_kernel=7, num_classes=10):
        super().__init__()
        self.config = dict(image_shape=list(image_shape), levels=levels, channels=channels, layers=layers,
                           kernel=kernel, first_kernel=first_kernel, num_classes=num_classes)  # rebuilds it
        self.image_shape, self.levels, self.num_classes = tuple(image_shape), levels, num_classes
        p0, p = first_kernel // 2, kernel // 2
        self.layers = nn.ModuleList([GatedLayer(1, channels, p0, "A", num_classes)] + [
            GatedLayer(channels, channels, p, "B", num_classes) for _ in range(layers - 1)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, 2 * channels, 1), nn.ReLU(),
                                  nn.Conv2d(2 * channels, levels, 1))
        self.rows_above = p0 + (layers - 1) * p  # the receptive field's reach: rows up, columns either side

    def forward(self, x, labels=None, last_row=False):  # labels: needed if num_classes
        """last_row (the sampler's): the logits of x's last row only, each stack on the rows still reached."""
        v = x / (self.levels - 1)  # values -> intensities in [0, 1]; 0 = black = the padding
        h, reach = v[:, :, -1:] if last_row else v, self.rows_above
        for layer in self.layers:
            v, h = layer(v, h, labels)
            reach -= layer.v_conv.kernel_size[0] - 1   # rows up that the layers still to come see
            v = v[:, :, -1 - reach:] if last_row else v
        return self.head(h)[:, :, None]                    # (B, L, 1, H, W): one channel


def nll_per_image(logits, x):
    """-log p(x | y) = -sum_t log softmax(logits_t)[x_t] in nats, one number per image (B,),
    from logits (B, L, 1, H, W) as forward gives them and x (B, 1, H, W) as sample does."""
    return F.cross_entropy(logits, x, reduction="none").sum(dim=(1, 2, 3))


# ============================================================================ sampling

@contextlib.contextmanager
def threads(n):
    """torch at n threads inside the block; the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def sample(model, n, labels=None, temperature=1.0, seed=0):
    """n images (n, 1, H, W) of the model's image_shape, drawn in raster order,
    x_t ~ softmax(logits_t / temperature): one network pass per pixel, over the pixels it sees
    (R rows up, R columns either side): the whole image's logits up to rounding, for less."""
    model.eval()
    (_, H, W), R, device = model.image_shape, model.rows_above, next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    x, progress = torch.zeros(n, 1, H, W, dtype=torch.long, device=device), Progress(H * W, "sample pixels")
    with threads(1):  # the same samples whatever the caller's count (2 threads: faster at 100 images, not at 10)
        for i, j in np.ndindex(H, W):
            top, left = max(0, i - R), max(0, j - R)
            logits = model(x[:, :, top:i + 1, left:j + R + 1], labels, last_row=True)[:, :, 0, 0, j - left]
            x[:, 0, i, j] = torch.multinomial(F.softmax(logits / temperature, dim=1), 1, generator=gen)[:, 0]
            progress(i * W + j + 1, n)
    return x


# ============================================================================ coding images into bits
#
# Arithmetic coding turns p(x_t | x_<t) into a code of about -log2 p(x) bits. The decoder
# must compute exactly the encoder's integer frequencies, so both get them from the same
# floats: the encoder from one pass over whole images, the decoder pixel by pixel from
# whole, partly decoded images (future pixels zero, and they only meet weights that are
# exactly zero), at the same input shape and at one thread (a kernel may sum in another
# order for another shape or thread count); tests check on the real kernels that the
# logits agree bit for bit. Then the same float64 softmax, the same integer rounding.

# --- shared: arithmetic coder ---
# Integer arithmetic coding (Witten, Neal & Cleary 1987) with a `state_bits`-bit
# state, all settled bits shifted out at once. The interval [low, high] stands
# for [low, high + 1) * 2^-state_bits, seen through the bits already sent.
# Between symbols: (I1) low < HALF <= high and (I2) not (QUARTER <= low and
# high < 3 QUARTER), so width = high - low + 1 > QUARTER, and any frequency
# f >= 1 out of total <= QUARTER gets a sub-interval of width >= 1.

class ArithmeticEncoder:
    """encode(low_count, high_count, total) codes the symbol whose cumulative
    counts are [low_count, high_count) of `total`; finish() -> bytes.

    Contract: 0 <= low_count < high_count <= total <= 2^(state_bits - 2).
    Length: at most -log2 prod_t (f_t / total_t) + 2 bits, plus the truncation
    of each sub-interval (< total / (QUARTER f) relative), plus padding to a byte."""

    def __init__(self, state_bits=32):
        if not 4 <= state_bits:
            raise ValueError("state_bits must be at least 4")
        self.state_bits = state_bits
        self.mask = (1 << state_bits) - 1
        self.half, self.quarter = 1 << (state_bits - 1), 1 << (state_bits - 2)
        self.low, self.high = 0, self.mask
        self.pending = 0            # underflow (E3) steps whose bit is not known yet
        self.acc, self.nacc = 0, 0  # bits waiting to fill whole bytes
        self.out = bytearray()

    def _emit(self, bits, n):
        """Append the n-bit integer `bits` to the output, whole bytes at a time."""
        acc, nacc = (self.acc << n) | bits, self.nacc + n
        if nacc >= 64:
            r = nacc & 7
            self.out += (acc >> r).to_bytes((nacc - r) >> 3, "big")
            acc, nacc = acc & ((1 << r) - 1), r
        self.acc, self.nacc = acc, nacc

    def encode(self, low_count, high_count, total):
        if not 0 <= low_count < high_count <= total <= self.quarter:
            raise ValueError(f"bad interval [{low_count}, {high_count}) of {total}")
        low, width, p = self.low, self.high - self.low + 1, self.state_bits
        # The symbol's slice; integer division rounds both ends down, as the decoder will.
        high = low + width * high_count // total - 1
        low = low + width * low_count // total
        # E1/E2, all steps at once: the n leading bits where low and high agree
        # are settled. The first releases the pending bits, which are its opposite.
        n = p - (low ^ high).bit_length()
        if n:
            top, k = low >> (p - n), self.pending
            if k:
                first = top >> (n - 1)
                follow = 0 if first else (1 << k) - 1
                self._emit((((first << k) | follow) << (n - 1)) | (top & ((1 << (n - 1)) - 1)), n + k)
                self.pending = 0
            else:
                self._emit(top, n)
            low = (low << n) & self.mask
            high = ((high << n) & self.mask) | ((1 << n) - 1)
        # E3 (underflow), all steps at once: while low = 01... and high = 10...,
        # drop the second bit of both and count one pending bit.
        if low & self.quarter and not high & self.quarter:
            rest = self.half - 1
            k = min(p - 1 - (~low & rest).bit_length(), p - 1 - (high & rest).bit_length())
            low = (low << k) & rest
            high = self.half | ((high << k) & rest) | ((1 << k) - 1)
            self.pending += k
        self.low, self.high = low, high

    def encode_bit(self, bit, count0, total):
        """A binary event: 0 owns [0, count0), 1 owns [count0, total)."""
        self.encode(count0 if bit else 0, total if bit else count0, total)

    def finish(self):
        """Send 2 bits (+ pending) that pin a point of [low, high], pad to a byte.

        By (I1)/(I2) low < QUARTER (send 01) or high >= 3 QUARTER (send 10);
        the decoder reads zeros past the end, which completes that point."""
        self.pending += 1
        first = 0 if self.low < self.quarter else 1
        k = self.pending
        self._emit((first << k) | (0 if first else (1 << k) - 1), k + 1)
        pad = -self.nacc % 8
        self._emit(0, pad)
        self.bits_before_padding = len(self.out) * 8 + self.nacc - pad
        if self.nacc:
            self.out += self.acc.to_bytes(self.nacc // 8, "big")
        self.acc = self.nacc = 0
        return bytes(self.out)


class ArithmeticDecoder:
    """Mirror of ArithmeticEncoder. Per symbol: c = target(total); the model
    finds the symbol with low_count <= c < high_count; consume(low_count,
    high_count, total) applies the encoder's exact update.
    (decode_bit and decode_symbol do both steps.)

    Invariant: low <= value <= high, `value` being the next state_bits bits of
    the stream seen through the same shifts; any bits keep it, so random bits
    decode to valid symbols. Past the end it reads zeros, but a real stream
    is never read more than state_bits bits beyond its end: reading further
    raises EOFError (a crafted length cannot make decoding run on unbounded)."""

    def __init__(self, data, state_bits=32):
        self.data = bytes(data)
        self.state_bits = state_bits
        self.mask = (1 << state_bits) - 1
        self.half, self.quarter = 1 << (state_bits - 1), 1 << (state_bits - 2)
        self.end_bits = 8 * len(self.data) + state_bits  # the most a real stream reads
        self.pos = 0                 # next byte of data to load
        self.buf, self.nbuf = 0, 0   # loaded, unread bits
        self.low, self.high = 0, self.mask
        self.value = self._read(state_bits)

    def _read(self, n):
        """The next n bits as an integer; zeros past the end of the data."""
        while self.nbuf < n:
            chunk = self.data[self.pos:self.pos + 8]
            self.pos += 8
            self.buf = (self.buf << 64) | int.from_bytes(chunk + bytes(8 - len(chunk)), "big")
            self.nbuf += 64
        self.nbuf -= n
        if 8 * self.pos - self.nbuf > self.end_bits:
            raise EOFError("the coded stream ended: more symbols asked for than it holds")
        bits = self.buf >> self.nbuf
        self.buf &= (1 << self.nbuf) - 1
        return bits

    def target(self, total):
        """The count c in [0, total) whose symbol's slice holds value:
        floor(width lo / total) <= value - low < floor(width hi / total)
        <=> lo <= c < hi for c = ((value - low + 1) total - 1) // width."""
        return ((self.value - self.low + 1) * total - 1) // (self.high - self.low + 1)

    def consume(self, low_count, high_count, total):
        if not 0 <= low_count < high_count <= total <= self.quarter:
            raise ValueError(f"bad interval [{low_count}, {high_count}) of {total}")
        low, width, p, value = self.low, self.high - self.low + 1, self.state_bits, self.value
        high = low + width * high_count // total - 1
        low = low + width * low_count // total
        n = p - (low ^ high).bit_length()
        if n:  # E1/E2: shift the settled bits out of low, high and value
            low = (low << n) & self.mask
            high = ((high << n) & self.mask) | ((1 << n) - 1)
            value = ((value << n) & self.mask) | self._read(n)
        if low & self.quarter and not high & self.quarter:  # E3: drop the second bit
            rest = self.half - 1
            k = min(p - 1 - (~low & rest).bit_length(), p - 1 - (high & rest).bit_length())
            low = (low << k) & rest
            high = self.half | ((high << k) & rest) | ((1 << k) - 1)
            value = (value & self.half) | ((value << k) & rest) | self._read(k)
        self.low, self.high, self.value = low, high, value

    def decode_bit(self, count0, total):
        """Inverse of encode_bit: 0 owns [0, count0), 1 owns [count0, total)."""
        bit = int(self.target(total) >= count0)
        self.consume(count0 if bit else 0, total if bit else count0, total)
        return bit

    def decode_symbol(self, cum):
        """cum: cumulative counts (V + 1 of them, cum[0] = 0, cum[V] = total)
        -> the symbol s with cum[s] <= target < cum[s + 1], consumed."""
        total = int(cum[-1])
        c, a, b = self.target(total), 0, len(cum) - 1
        while b - a > 1:  # binary search, cum[a] <= c < cum[b]
            mid = (a + b) // 2
            if cum[mid] > c:
                b = mid
            else:
                a = mid
        self.consume(int(cum[a]), int(cum[a + 1]), total)
        return a


def quantise(probs, k=16):
    """Float probabilities (..., V) -> int64 frequencies (..., V), sum exactly 2^k, each >= 1.

    f = 1 + floor(p (2^k - V)) reserves one count per symbol (a symbol the
    model deems impossible stays codable) and shares the rest in proportion
    to p; the few counts lost to rounding (fewer than V) go to the most
    probable symbol. Deterministic: the same floats give the same integers."""
    p = np.asarray(probs, dtype=np.float64)
    v, total = p.shape[-1], 1 << k
    if total < v:
        raise ValueError(f"2^{k} counts cannot give each of {v} symbols at least 1")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    freq = 1 + np.floor(p * (total - v)).astype(np.int64)
    rest = total - freq.sum(-1, keepdims=True)  # in [0, V): sum(floor) <= sum(p (2^k - V))
    top = p.argmax(-1)[..., None]
    np.put_along_axis(freq, top, np.take_along_axis(freq, top, -1) + rest, -1)
    return freq


def cumulative(freq):
    """(..., V) frequencies -> (..., V + 1) cumulative counts starting at 0."""
    cum = np.zeros(freq.shape[:-1] + (freq.shape[-1] + 1,), np.int64)
    np.cumsum(freq, -1, out=cum[..., 1:])
    return cum
# --- end shared ---

CODER_K = 16  # a pixel's probabilities become integer frequencies summing to 2^16


@torch.no_grad()
def encode_chunk(model, x, labels, measure=None):
    """Images x (B, 1, H, W) ints, their labels (B,) or None -> one coded stream (bytes): the
    labels, then pixel t of every image, t in raster order. measure["bits"] (if given) sums
    -log2 p(x_t) over the pixels, the length the stream should be near."""
    model.eval()
    enc, rows = ArithmeticEncoder(), np.arange(len(x))
    for y in (labels.tolist() if labels is not None else []):
        enc.encode(y, y + 1, model.num_classes)                    # frequency 1 of num_classes
    with threads(1):
        logits = model(x, labels)[:, :, 0]                         # (B, L, H, W): one pass
    for i, j in np.ndindex(*x.shape[2:]):
        probs = torch.softmax(logits[:, :, i, j].double(), dim=1).numpy()      # (B, L), float64
        cum = cumulative(quantise(probs, CODER_K))                              # (B, L + 1) integers
        v = x[:, 0, i, j].numpy()
        for lo, hi in zip(cum[rows, v].tolist(), cum[rows, v + 1].tolist()):
            enc.encode(lo, hi, 1 << CODER_K)
        if measure is not None:
            measure["bits"] -= np.log2(probs[rows, v]).sum()
    return enc.finish()


@torch.no_grad()
def decode_chunk(model, payload, n):
    """Inverse of encode_chunk -> images (n, 1, H, W) and labels (n,) or None, decoded one
    pixel at a time: x_t from the pixels before it (the rest zero)."""
    model.eval()
    dec, (_, H, W) = ArithmeticDecoder(payload), model.image_shape
    labels = torch.tensor([dec.decode_symbol(range(model.num_classes + 1)) for _ in range(n)]) \
        if model.num_classes else None
    x, progress = torch.zeros(n, 1, H, W, dtype=torch.long), Progress(H * W, "decode pixels")
    with threads(1):
        for i, j in np.ndindex(H, W):
            probs = torch.softmax(pixel_logits(model, x, labels, i, j).double(), dim=1).numpy()   # (B, L)
            cum = cumulative(quantise(probs, CODER_K))                                           # (B, L + 1)
            x[:, 0, i, j] = torch.tensor([dec.decode_symbol(row) for row in cum.tolist()])
            progress(i * W + j + 1, n)
    return x, labels


def pixel_logits(model, x, labels, i, j):
    """Logits (B, L) of pixel (i, j) from whole, partly decoded images: the encoder's input shape,
    so its kernels and rounding (a crop, as the sampler takes, can move a logit by 1e-6)."""
    return model(x, labels)[:, :, 0, i, j]


def coding_bound_bits(pixels, streams, levels, labels=0):
    """How far the coded payload may exceed the exact -log2 p of its pixels (plus
    log2 10 per label): per pixel, rounding p to f / 2^k costs at most -log2(1 - L / 2^k)
    (f >= p (2^k - L)); per symbol, the coder's integer interval at most
    -log2(1 - total / 2^30) (state_bits 32); per stream, 2 bits to finish and 7 of padding."""
    slack = -math.log2(1 - 2 ** CODER_K / 2 ** 30) * pixels - math.log2(1 - 10 / 2 ** 30) * labels
    return -math.log2(1 - levels / 2 ** CODER_K) * pixels + slack + 9 * streams


# ============================================================================ the experiment

# The test set is binarised once, with this seed whatever --seed says, so every run
# scores the same binary images (vae.py binarises them the same way).
TEST_BINARISATION_SEED = 1234


def binarise(images, generator=None):
    """Intensities (B, 1, H, W) in [0, 1] -> pixels x ~ Bernoulli(intensity), int64: a fresh draw
    each call ("dynamic binarisation": the training set never repeats exactly, against overfitting)."""
    return torch.bernoulli(images, generator=generator).long()


def update_average(average, model, decay, step):
    """Polyak averaging, as in PixelCNN++: w_avg <- w_avg + (1 - d_t) (w - w_avg) with
    d_t = min(decay, (1 + t) / (10 + t)), so the random start is forgotten early (with a
    constant 0.999 it would still weigh 0.999^1000 = 37% after 1,000 steps)."""
    d_t = min(decay, (1 + step) / (10 + step))
    for w_avg, w in zip(average.parameters(), model.parameters()):
        w_avg.lerp_(w.detach(), 1 - d_t)


def train(model, images, labels, total, batch_size=32, lr=2e-3, ema_decay=0.0, bf16=True):
    """`total` Adam steps on the mean NLL per image of freshly binarised batches, the rate
    decayed along a cosine from lr to 0; with ema_decay, the average of the weights is the
    model returned."""
    device, per_epoch, step, progress = next(model.parameters()).device, len(images) // batch_size, 0, Progress(total)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    average = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    images, labels = images.to(device), labels.to(device) if labels is not None else None
    model.train()
    while step < total:  # an epoch: the images in a new order, batch by batch
        batches = torch.randperm(len(images), device=device)[:per_epoch * batch_size].view(per_epoch, -1)
        for idx in batches[:total - step]:
            x = binarise(images[idx])                                            # (B, 1, H, W)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = model(x, labels[idx] if labels is not None else None)   # (B, L, 1, H, W)
            loss = nll_per_image(logits.float(), x).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.step()
            if average is not None:
                update_average(average, model, ema_decay, step)
            step += 1
            progress(step, batch_size, nll_nats=loss.detach())
    return average or model


@torch.no_grad()
def evaluate(model, x, labels=None, batch_size=50):
    """Exact test NLL: mean over images of -log p(x | y) in nats, and in bits per dim."""
    model.eval()
    device = next(model.parameters()).device
    total, progress = torch.zeros((), dtype=torch.float64, device=device), Progress(len(x), "eval")
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), labels[i:i + batch_size].to(device) if labels is not None else None
        total += nll_per_image(model(xb, yb), xb).double().sum()  # on the device: no host sync per batch
        progress(i + len(xb), len(xb), nll_nats=total / (i + len(xb)))
    nats = total.item() / len(x)
    return {"test_nll_nats": nats, "test_bits_per_dim": nats / (x[0].numel() * math.log(2))}


def write_samples(model, n, temperature, seed, out):
    """samples.npy (n, 1, H, W) in [0, 1], samples.png: a row per class, if conditional."""
    per_class = -(-n // model.num_classes) if model.num_classes else None
    labels = torch.arange(n) // per_class if per_class else None
    x = sample(model, n, labels.to(next(model.parameters()).device) if per_class else None, temperature, seed)
    samples = (x.float() / (model.levels - 1)).cpu().numpy()
    atomic_write(out / "samples.npy", lambda f: np.save(f, samples))
    write_png(out / "samples.png", image_grid(samples, ncol=per_class or min(n, 10)))
    if per_class:
        atomic_write(out / "sample_labels.npy", lambda f: np.save(f, labels.numpy()))


# The archive: "PXC2" | sha256 of the checkpoint (32 bytes) | fingerprint (64) | images, chunk (4 + 4)
# | per chunk its length and the CRC32 of its images and labels (4 + 4) | the chunks. Decoding needs the
# very model that coded, on floats that agree: the fingerprint names what a pass's floats depend on
# besides the weights and the input shape (coding runs at one thread). Every field is checked before use.
ARCHIVE_NAME, ARCHIVE_MAGIC, HEAD = "test_images.pxc", b"PXC2", struct.Struct(">4s32s64sII")
MAX_IMAGES, MAX_CHUNK = 100_000, 10_000  # a chunk is the decoder's batch: its memory grows with it
FINGERPRINT = f"torch {torch.__version__}, {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"[:64]


def images_crc(x, labels):
    return zlib.crc32(x.numpy().astype(np.uint8).tobytes()
                      + (labels.numpy().astype(np.uint8).tobytes() if labels is not None else b""))


def compress(model, sha, x, labels, chunk, out):
    """Code images x (N, 1, H, W) and labels into out/test_images.pxc: its size, -log2 p(x), the bound."""
    measure, chunks, table, start = {"bits": 0.0}, [], [], time.time()
    progress = Progress(len(x), "encode")
    for s in range(0, len(x), chunk):
        xb, yb = x[s:s + chunk], labels[s:s + chunk] if labels is not None else None
        chunks.append(encode_chunk(model, xb, yb, measure))
        table += [len(chunks[-1]), images_crc(xb, yb)]
        progress(s + len(xb), len(xb), kbytes=sum(map(len, chunks)) / 1000)
    head = HEAD.pack(ARCHIVE_MAGIC, sha, FINGERPRINT.encode(), len(x), chunk) + struct.pack(f">{len(table)}I", *table)
    atomic_write(out / ARCHIVE_NAME, lambda f: f.write(head + b"".join(chunks)))
    n, size, label_bits = len(x), len(head) + sum(map(len, chunks)), math.log2(model.num_classes or 1)
    coded, nll = 8 * size / n, measure["bits"] / n
    bound = coding_bound_bits(x.numel(), len(chunks), model.levels, n if labels is not None else 0) + 8 * len(head)
    return {"test_images": n, "archive_bytes": size, "test_coded_bits_per_image": coded,
            "test_nll_bits_per_image": nll, "label_bits_per_image": label_bits,
            "overhead_bits_per_image": coded - nll - label_bits, "overhead_bound_bits_per_image": bound / n,
            "encode_seconds": round(time.time() - start, 1)}


def decompress(model, sha, path, image_range, out):
    """Images A..B-1 of an archive (whole chunks, each checked by its CRC32) -> out/decoded.npy, .png."""
    with open(path, "rb") as f:
        blob = f.read(1 << 30)  # a longer file fails the length check below
    magic, coded_sha, coded_on, n, chunk = HEAD.unpack_from(blob.ljust(HEAD.size, b"\0"))
    streams = -(-n // chunk) if 1 <= n <= MAX_IMAGES and 1 <= chunk <= MAX_CHUNK else 0
    if magic != ARCHIVE_MAGIC or not streams or len(blob) < HEAD.size + 8 * streams:
        raise RunError(f"{path}: not a {SCRIPT} archive, or its header is damaged")
    table = struct.unpack_from(f">{2 * streams}I", blob, HEAD.size)
    ends = np.cumsum((HEAD.size + 8 * streams,) + table[::2]).tolist()
    if ends[-1] != len(blob):
        raise RunError(f"{path}: the header says {ends[-1]} bytes, the file holds {len(blob)}; it is truncated")
    if coded_sha != sha:
        raise RunError(f"{path} was coded with another checkpoint; only the model that coded it can decode it")
    coded_on = coded_on.rstrip(b"\0").decode(errors="replace")
    if coded_on != FINGERPRINT:
        raise RunError(f"{path} was coded under {coded_on}, this is {FINGERPRINT}: the model's floats, "
                       "hence its frequencies, may differ; decode it there")
    (a, b), start = image_range or (0, n), time.time()
    a, b, decoded = min(a, n), min(b, n), [torch.zeros(0, *model.image_shape, dtype=torch.long)]
    for k in range(a // chunk, -(-b // chunk)):
        try:
            x, y = decode_chunk(model, blob[ends[k]:ends[k + 1]], min(chunk, n - k * chunk))
        except (EOFError, ValueError):
            raise RunError(f"{path}: chunk {k} is damaged") from None
        if images_crc(x, y) != table[2 * k + 1]:
            raise RunError(f"{path}: chunk {k} decodes to other images than were coded (CRC32); it is damaged")
        decoded.append(x[max(a - k * chunk, 0):b - k * chunk])
    x = torch.cat(decoded)
    atomic_write(out / "decoded.npy", lambda f: np.save(f, x.numpy().astype(np.uint8)))
    write_png(out / "decoded.png", image_grid(x[:100].numpy() / (model.levels - 1), 10))
    return {"decoded_images": len(x), "image_range": [a, b], "decode_seconds": round(time.time() - start, 1)}


# ============================================================================ main

def parse_args(argv=None):
    def span(text):
        return tuple(int(v) for v in text.split(":"))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="mnist", help="mnist, or a .npy of grey images (N, H, W): its last tenth tests")
    p.add_argument("--data-dir", default=str(Path(__file__).parent / "data" / "mnist"), help="MNIST's folder")
    p.add_argument("--out", help=f"output folder (None: runs/{SCRIPT}, or with --ckpt <its folder>/<mode>)")
    p.add_argument("--epochs", type=positive_float, default=1.2, help="passes over the training images")
    p.add_argument("--steps", type=nonnegative_int, default=0, help="cap on optimizer steps (0: none)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per step")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="Adam's rate, cosine-decayed to 0")
    p.add_argument("--ema-decay", type=fraction, default=0.0, help="use an average of the weights (e.g. 0.9995)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast in training")
    p.add_argument("--channels", type=positive_int, default=32, help="channels of each stack")
    p.add_argument("--layers", type=positive_int, default=8, help="gated layers: 1 mask A, the rest mask B")
    p.add_argument("--unconditional", action="store_true", help="ignore the labels (unlabelled data has none)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seeds the weights, data order and samples")
    p.add_argument("--num-samples", type=positive_int, default=100, help="images to sample")
    p.add_argument("--test-limit", type=nonnegative_int, default=0, help="use the first N test images (0: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sample-only", action="store_true", help="load --ckpt, evaluate and sample")
    mode.add_argument("--compress", action="store_true", help=f"code the test images into <out>/{ARCHIVE_NAME}")
    mode.add_argument("--decompress", metavar="FILE", help="decode an archive with the --ckpt that coded it")
    p.add_argument("--ckpt", help="the model.pt for --sample-only, --compress, --decompress")
    p.add_argument("--image-range", metavar="A:B", type=checked(span, lambda r: len(r) == 2 and 0 <= r[0] < r[1],
                   "A:B, 0 <= A < B"), help="with --decompress: images A..B-1 only")
    p.add_argument("--chunk", type=checked(int, lambda v: 1 <= v <= MAX_CHUNK, f"in 1..{MAX_CHUNK}"), default=100,
                   help="images per coded stream: the decoder's batch and unit of random access")
    args = p.parse_args(argv)
    args.mode = next((m for m in ("sample_only", "compress", "decompress") if getattr(args, m)), None)
    shaping = [k for k in ("channels", "layers", "unconditional") if getattr(args, k) != p.get_default(k)]
    if args.mode and (shaping or not args.ckpt):
        p.error(f"--{args.mode.replace('_', '-')} rebuilds the model from --ckpt PATH"
                + (f"; drop --{', --'.join(shaping)}" if shaping else ""))
    if args.image_range and not args.decompress or args.ckpt and not args.mode:
        p.error("--image-range goes with --decompress; --ckpt with --sample-only, --compress, --decompress")
    if args.mode in ("compress", "decompress") and args.device == "cuda":
        p.error("--compress/--decompress run on the CPU, where bit-identical logits are tested")
    return args


def run(args):
    out = Path(args.out or (Path(args.ckpt).parent / args.mode if args.mode else f"runs/{SCRIPT}"))
    if args.mode and (out / "model.pt").exists():
        raise RunError(f"--out {out} holds a model.pt (a training run); give another --out")
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    model = load_checkpoint(args.ckpt, lambda cfg: GatedPixelCNN(**cfg))[0] if args.mode else None
    sha = hashlib.sha256(Path(args.ckpt).read_bytes()).digest() if args.mode else None
    metrics = decompress(model, sha, args.decompress, args.image_range, out) if args.decompress \
        else run_on_data(args, model, sha, out)
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return metrics


def run_on_data(args, model, sha, out):
    """Train (or load) a model, evaluate it and sample; or --compress the test images."""
    images, labels = load_images(args.data, args.data_dir, "test")
    model = model or GatedPixelCNN(images.shape[1:], 2, args.channels, args.layers, num_classes=0
                                   if args.unconditional or labels is None else int(labels.max()) + 1)
    if images.shape[1:] != (1, *model.image_shape[1:]) or model.num_classes and labels is None:
        raise RunError(f"--data {args.data}: {'un' * (labels is None)}labelled images {tuple(images.shape[1:])}; "
                       f"the model takes {'un' * (not model.num_classes)}labelled grey images {model.image_shape}")
    x_test = binarise(images, torch.Generator().manual_seed(TEST_BINARISATION_SEED))[:args.test_limit or None]
    y_test = labels[:len(x_test)] if model.num_classes else None  # a limited run scores a prefix
    if args.compress:
        return compress(model, sha, x_test, y_test, args.chunk, out)
    device = pick_device(args.device)
    model, metrics, start = model.to(device), {"steps": 0}, time.time()
    if not args.mode:
        images, labels = load_images(args.data, args.data_dir, "train")
        if len(images) < args.batch_size:
            raise RunError(f"--batch-size {args.batch_size} is larger than the training set ({len(images)} images)")
        steps = min(max(1, int(args.epochs * (len(images) // args.batch_size))), args.steps or math.inf)
        model = train(model, images, labels if model.num_classes else None, steps, args.batch_size, args.lr,
                      args.ema_decay, args.bf16)
        save_checkpoint(out / "model.pt", model.config, model.state_dict())
        metrics = {"steps": steps, "train_seconds": round(time.time() - start, 1),
                   "train_images_per_second": round(steps * args.batch_size / (time.time() - start), 1)}
    metrics.update(evaluate(model, x_test, y_test), test_images=len(x_test), conditional=model.num_classes > 0,
                   device=str(device))
    write_samples(model, args.num_samples, args.temperature, args.seed, out)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (RunError, OSError) as e:
        sys.exit(f"error: {e}")


# ============================================================================ appendix: shared blocks

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
