"""Arithmetic coding: a model's P(x) becomes a file within two bits of -log2 P(x).

Knowing P(x) gives the best lossless code, about -log2 P(x) bits. Arithmetic
coding reaches it for a whole sequence: split [0, 1) by the CDF one symbol at a
time and send the shortest binary fraction inside the final interval

    [ P(X < x), P(X <= x) ),    width  P(x) = prod_t P(x_t | x_<t),
    code length  <=  -log2 P(x) + 2 bits   (+ the integer truncation, + padding).

An autoregressive model gives exactly the conditionals P(x_t | x_<t) the coder
needs, in order, so every autoregressive model is a compressor: the decoder
replays the same model on the bytes it has decoded so far (Witten, Neal &
Cleary, "Arithmetic coding for data compression", CACM 1987).

Top to bottom: the textbook coder (one bit per loop: the specification), the
fast integer coder (all settled bits at once: the same bytes), the quantiser
(float probabilities -> integer frequencies, each >= 1), an adaptive order-0
model, a byte-level GRU coded in lock-step streams, the container, the CLI.
The appendix: plumbing, the archive format and its checks, the training text,
CLI helpers, the PPM context model (the default of `compress`), the benchmark.
Neural archives depend on float kernels: the header records torch, device, CPU
kernel path and a hash of the quantised tables on a fixed probe, and a machine
that would compute other tables refuses before decoding (an integer-exact GRU
would make archives portable, at the cost of a rewrite).

Shape legend: B parallel streams (or batch), T time steps, V = 256 byte values, H hidden units.

Run:   python arith_coding.py                      (= train: about 9 minutes on a 2-core CPU)
       python arith_coding.py compress IN OUT [--model context|order0|neural]
       python arith_coding.py decompress OUT IN.copy [--max-size BYTES]
       python arith_coding.py sample --model neural --num-samples 400
       python arith_coding.py bench                (archive sizes against zlib, bz2, xz; speeds)
train writes runs/arith_coding/: model.pt, samples.txt and metrics.json (held-out: 1.70 bits/byte).
"""
import argparse
import bz2
import hashlib
import json
import lzma
import math
import os
import random
import struct
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "arith_coding"


# ----------------------------------------------------------------------------- the coder, as in the lecture
#
# The interval [low, high] holds `state_bits`-bit integers and stands for
# [low, high + 1) * 2^-state_bits. After each symbol, while the interval lies
# in one half (E1: [0, HALF), E2: [HALF, 1)) the leading bit is settled: send
# it and double the interval. While it straddles the middle inside
# [QUARTER, 3 QUARTER) (E3, underflow) the next bit is not known yet but will be
# the opposite of the one after it: count a pending bit and double around the
# middle. At the end, two more bits pin a point inside the interval.

class TextbookEncoder:
    """The bit-at-a-time encoder: the specification ArithmeticEncoder must match byte for byte."""

    def __init__(self, state_bits=32):
        self.half, self.quarter = 1 << (state_bits - 1), 1 << (state_bits - 2)
        self.low, self.high = 0, (1 << state_bits) - 1
        self.pending, self.bits = 0, []

    def _put(self, bit):
        """Send a bit, then the pending bits, each its opposite."""
        self.bits += [bit] + [1 - bit] * self.pending
        self.pending = 0

    def encode(self, low_count, high_count, total):
        width = self.high - self.low + 1
        self.high = self.low + width * high_count // total - 1
        self.low = self.low + width * low_count // total
        half, quarter = self.half, self.quarter
        while True:
            if self.high < half:                                      # E1
                self._put(0)
            elif self.low >= half:                                    # E2
                self._put(1)
                self.low, self.high = self.low - half, self.high - half
            elif self.low >= quarter and self.high < 3 * quarter:     # E3
                self.pending += 1
                self.low, self.high = self.low - quarter, self.high - quarter
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1

    def finish(self):
        """01 if low < QUARTER, else 10 (with the pending bits), zero padding to a byte."""
        self.pending += 1
        self._put(0 if self.low < self.quarter else 1)
        bits = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


class TextbookDecoder:
    """The bit-at-a-time decoder: `value` is a state_bits-bit window on the code
    stream (zeros past its end), shifted exactly as low and high are."""

    def __init__(self, data, state_bits=32):
        self.half, self.quarter = 1 << (state_bits - 1), 1 << (state_bits - 2)
        self.low, self.high = 0, (1 << state_bits) - 1
        self.bits = [(byte >> (7 - i)) & 1 for byte in data for i in range(8)]
        self.pos, self.value = 0, 0
        for _ in range(state_bits):
            self.value = 2 * self.value + self._bit()

    def _bit(self):
        self.pos += 1
        return self.bits[self.pos - 1] if self.pos <= len(self.bits) else 0

    def target(self, total):
        """The count c with floor(width lo / total) <= value - low < floor(width hi / total)."""
        return ((self.value - self.low + 1) * total - 1) // (self.high - self.low + 1)

    def consume(self, low_count, high_count, total):
        width = self.high - self.low + 1
        self.high = self.low + width * high_count // total - 1
        self.low = self.low + width * low_count // total
        half, quarter = self.half, self.quarter
        while True:
            if self.high < half:
                pass
            elif self.low >= half:
                self.low, self.high, self.value = self.low - half, self.high - half, self.value - half
            elif self.low >= quarter and self.high < 3 * quarter:
                self.low, self.high = self.low - quarter, self.high - quarter
                self.value -= quarter
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1
            self.value = 2 * self.value + self._bit()


# ----------------------------------------------------------------------------- the fast coder and the quantiser
# (also carried by pixelcnn.py, which codes images with it)

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


# ----------------------------------------------------------------------------- an adaptive order-0 model
#
# Each model codes one byte with encode(enc, x) and decodes one with decode(dec),
# updating itself afterwards from the byte alone: the decoder's copy of the
# model sees exactly what the encoder's copy saw.

class Order0Model:
    """Adaptive order 0: P(x_t = s | x_<t) = n_s / sum(n), with n_s = 1 + count
    of s so far; when sum(n) reaches `limit` all counts are halved (rounding up),
    which keeps the model adaptive and the total within the coder's range.

    The cumulative table lives in a Fenwick tree: prefix sums, updates and the
    decoder's search each cost log2(256) = 8 steps instead of 256."""

    def __init__(self, limit=1 << 16):
        self.limit = limit
        self.freq = [1] * 256
        self._rebuild()

    def _rebuild(self):
        self.total = sum(self.freq)
        self.tree = tree = [0] * 257  # tree[i] = sum of freq over (i - lowbit(i), i]
        for s, f in enumerate(self.freq):
            i = s + 1
            while i <= 256:
                tree[i] += f
                i += i & -i

    def _update(self, s):
        self.freq[s] += 1
        tree = self.tree
        i = s + 1
        while i <= 256:
            tree[i] += 1
            i += i & -i
        self.total += 1
        if self.total >= self.limit:
            self.freq = [(f + 1) // 2 for f in self.freq]
            self._rebuild()

    def cum_low(self, s):
        """sum(freq[0:s]) from the tree: one step per set bit of s."""
        tree, lo, i = self.tree, 0, s
        while i:
            lo += tree[i]
            i &= i - 1
        return lo

    def encode(self, enc, s):
        lo = self.cum_low(s)
        enc.encode(lo, lo + self.freq[s], self.total)
        self._update(s)

    def decode(self, dec):
        target = rest = dec.target(self.total)
        tree, pos, step = self.tree, 0, 128
        while step:  # binary descent: the largest pos with prefix(pos) <= target
            t = tree[pos + step]
            if t <= rest:
                pos += step
                rest -= t
            step >>= 1
        lo = target - rest
        dec.consume(lo, lo + self.freq[pos], self.total)
        self._update(pos)
        return pos


def encode_with(model, data, state_bits=32, enc=None):
    """Code the bytes `data` with a per-byte model; returns (payload, encoder)."""
    enc = ArithmeticEncoder(state_bits) if enc is None else enc
    for x in data:
        model.encode(enc, x)
    return enc.finish(), enc


def decode_with(model, payload, n, state_bits=32):
    dec = ArithmeticDecoder(payload, state_bits)
    return bytes(model.decode(dec) for _ in range(n))


# ----------------------------------------------------------------------------- the neural model, coded in lock-step

START = 10  # '\n' stands in for the byte before each stream's first byte


class ByteGRU(nn.Module):
    """P(x_t | x_<t) over bytes: embedding -> GRU -> linear to 256 logits."""

    def __init__(self, hidden=512, embed=64):
        super().__init__()
        self.embed = nn.Embedding(256, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 256)

    def forward(self, x, h=None):
        """x (B, T) previous bytes -> logits (B, T, V) of the next ones, state (1, B, H)."""
        y, h = self.rnn(self.embed(x), h)
        return self.head(y), h


def bits_per_byte_loss(logits, x):
    """Cross-entropy in bits per byte: mean -log2 P(x_t | x_<t)."""
    return F.cross_entropy(logits.reshape(-1, 256), x.reshape(-1)) / math.log(2)


def stream_layout(n, max_streams, min_chunk=4096):
    """Cut n bytes into B consecutive streams of `chunk` bytes (the last one
    shorter): the lengths of the B streams coded in lock-step."""
    if n == 0:
        return []
    chunk = max(min_chunk, -(-n // max_streams))
    return [min(chunk, n - i) for i in range(0, n, chunk)]


@torch.no_grad()
def neural_lockstep(model, device, lengths, k, code_step):
    """Drive B = len(lengths) coders in lock-step, one byte of every stream per
    model call. The encoder and the decoder both run exactly this loop: the same
    calls on tensors of the same shape, so the same floats, so the same integer
    frequencies. code_step(t, probs, cum) codes (or decodes) byte t of each
    stream and returns the B bytes to feed back (START where a stream ended)."""
    model.eval()
    prev = torch.full((len(lengths), 1), START, dtype=torch.long, device=device)  # (B, 1)
    h = None
    for t in range(max(lengths, default=0)):
        logits, h = model(prev, h)                                 # (B, 1, V)
        probs = torch.softmax(logits[:, 0].float(), -1).cpu().numpy()  # (B, V)
        cum = cumulative(quantise(probs, k))                       # (B, V + 1)
        x = code_step(t, probs, cum)
        prev = torch.as_tensor(x, dtype=torch.long, device=device).view(-1, 1)


def neural_encode(model, device, data, lengths, k=24, state_bits=32, measure=None):
    """-> one payload per stream. `measure` (a dict) receives the ideal code
    length under the float model and under the quantised model, in bits."""
    chunk = lengths[0] if lengths else 0
    x = np.full((len(lengths), chunk), START, np.int64)
    x.reshape(-1)[:len(data)] = np.frombuffer(data, np.uint8)
    encs = [ArithmeticEncoder(state_bits) for _ in lengths]
    rows = np.arange(len(lengths))
    float_bits = quant_bits = 0.0

    def code_step(t, probs, cum):
        nonlocal float_bits, quant_bits
        xt = x[:, t]
        lo, hi = cum[rows, xt], cum[rows, xt + 1]
        live = rows if t < lengths[-1] else rows[:-1]  # only the last stream may be shorter
        lo_l, hi_l = lo.tolist(), hi.tolist()
        for b in live.tolist():
            encs[b].encode(lo_l[b], hi_l[b], 1 << k)
        if measure is not None:
            float_bits -= np.log2(probs[live, xt[live]].astype(np.float64)).sum()
            quant_bits -= np.log2((hi[live] - lo[live]) / (1 << k)).sum()
        return xt

    neural_lockstep(model, device, lengths, k, code_step)
    if measure is not None:
        measure.update(float_bits=float(float_bits), quantised_bits=float(quant_bits))
    return [e.finish() for e in encs]


def neural_decode(model, device, payloads, lengths, k=24, state_bits=32):
    decs = [ArithmeticDecoder(p, state_bits) for p in payloads]
    rows = np.arange(len(lengths))
    total, columns = 1 << k, []  # grows with the bytes decoded (nothing sized by the header)

    def code_step(t, probs, cum):
        live = rows if t < lengths[-1] else rows[:-1]
        targets = np.array([decs[b].target(total) for b in live.tolist()], np.int64)
        # the symbol s with cum[s] <= target < cum[s + 1], for every live stream
        s = (cum[live, 1:] <= targets[:, None]).sum(1)
        lo, hi = cum[live, s].tolist(), cum[live, s + 1].tolist()
        for b, l, h in zip(live.tolist(), lo, hi):
            decs[b].consume(l, h, total)
        x = np.full(len(rows), START, np.int64)
        x[live] = s
        columns.append(x.astype(np.uint8))
        return x

    neural_lockstep(model, device, lengths, k, code_step)
    if not columns:
        return b""
    return np.stack(columns, 1).reshape(-1)[:sum(lengths)].tobytes()


def load_neural(ckpt_path, device):
    """(model on device, sha256 of the checkpoint file) or a one-line error."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt, {"hidden": int, "embed": int}, ckpt_path)
    if not (1 <= cfg["hidden"] <= 8192 and 1 <= cfg["embed"] <= 8192):
        raise RunError(f"{ckpt_path}: config hidden {cfg['hidden']} / embed {cfg['embed']} out of range")
    model = load_weights(ByteGRU(cfg["hidden"], cfg["embed"]), ckpt["model"], ckpt_path).to(device)
    return model, hashlib.sha256(Path(ckpt_path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the container
#
#   "ACPY" | version (1 byte) | header length (4 bytes) | header (JSON) | CRC32 of all before (4)
#   | payload: the coded streams back to back, or in stored mode the input itself.
# Every header value is checked for type and range before use; a claimed length
# that its payload cannot hold is refused before decoding. Packing, unpacking and
# those checks are plumbing: they come after main, under "the archive format".

MAX_ORDER, MAX_MIN_MATCH, MAX_STREAMS = 32, 4096, 4096
DEFAULT_CKPT = f"runs/{SCRIPT}/model.pt"


def make_byte_model(kind, order=10, min_match=64, memory_mb=1024):
    return Order0Model() if kind == "order0" else ContextModel(order, min_match=min_match,
                                                              memory_mb=memory_mb)


def compress(data, model_name, state_bits=32, order=10, min_match=64, memory_mb=1024,
             ckpt=DEFAULT_CKPT, device="auto", k=24, streams=256, measure=None):
    """bytes -> archive bytes with the chosen model, or stored mode if that is smaller.
    `measure` (a dict) receives the model's ideal code length in bits."""
    spec = {"model": model_name, "state_bits": state_bits}
    if model_name == "neural":
        device = pick_device(device)
        model, digest = load_neural(ckpt, device)
        lengths = stream_layout(len(data), streams)
        spec.update(ckpt_sha256=digest, k=k, chunk=lengths[0] if lengths else 1,
                    fingerprint=kernel_fingerprint(model, device, len(lengths), k))
        payloads = neural_encode(model, device, data, lengths, k, state_bits, measure)
    else:
        if model_name == "context":
            spec.update(order=order, min_match=min_match, memory_mb=memory_mb)
        model = make_byte_model(model_name, order, min_match, memory_mb)
        enc = MeasuringEncoder(state_bits) if measure is not None else None
        payload, enc = encode_with(model, data, state_bits, enc)
        payloads = [payload]
        if measure is not None:
            measure.update(quantised_bits=enc.ideal_bits, bits_before_padding=enc.bits_before_padding)
    blob, stored = pack_coded(spec, data, payloads), pack_stored(data)
    if measure is not None:
        measure["stored"] = len(stored) < len(blob)
    return stored if len(stored) < len(blob) else blob


def decode_neural(header, payloads, ckpt, device, name):
    if not Path(ckpt).is_file():
        raise RunError(f"{name} was made with the neural model (sha256 {header['ckpt_sha256'][:12]}...); "
                       f"its model.pt was not found at {ckpt} (pass --ckpt PATH)")
    device = pick_device(device)
    made = header["fingerprint"]
    if device.type != made["device"]:
        raise RunError(f"{name} was made on {made['device']}; decode it there too "
                       f"(--device {made['device']}): float results differ between devices")
    model, digest = load_neural(ckpt, device)
    if digest != header["ckpt_sha256"]:
        raise RunError(f"{ckpt} is not the model {name} was made with "
                       f"(sha256 {digest[:12]}... != {header['ckpt_sha256'][:12]}...)")
    lengths = stream_layout(header["length"], MAX_STREAMS, header["chunk"])
    if made["probe_sha256"] is not None:  # version 2 archives carry no fingerprint
        check_fingerprint(made, kernel_fingerprint(model, device, len(lengths), header["k"]), name)
    return neural_decode(model, device, payloads, lengths, header["k"], header["state_bits"])


def decompress(blob, ckpt=DEFAULT_CKPT, device="auto", max_size=None, name="archive"):
    """archive bytes -> the original bytes, or a one-line RunError (nothing decoded unchecked)."""
    header, payloads = unpack_archive(blob, name)
    check_length(header, payloads, max_size, name)
    kind = header["model"]
    try:
        if kind == "stored":
            data = payloads[0] if payloads else b""
        elif kind == "neural":
            data = decode_neural(header, payloads, ckpt, device, name)
        else:
            model = make_byte_model(kind, header.get("order", 0), header.get("min_match", 1),
                                    header.get("memory_mb", 0))
            data = decode_with(model, payloads[0], header["length"], header["state_bits"])
    except EOFError:
        raise RunError(f"{name} is damaged: its payload ends before the {header['length']} bytes "
                       "its header claims") from None
    if zlib.crc32(data) != header["crc32"]:
        raise RunError(f"{name} decoded to data that fails the CRC check (wrong model or damaged file)")
    return data


# ----------------------------------------------------------------------------- sampling: the decoder fed random bits

def sample_bytes(model_name, n, seed=0, prime=b"", state_bits=32, order=10, min_match=64,
                 memory_mb=1024, ckpt=DEFAULT_CKPT, device="auto", k=24):
    """Decode n bytes from uniform random bits: an exact sample from the
    (quantised) model, since each symbol's slice of [0, 1) has its probability."""
    noise = np.random.default_rng(seed).bytes(64 * n + 64)
    if model_name == "neural":
        device = pick_device(device)
        model, _ = load_neural(ckpt, device)
        return neural_decode(model, device, [noise], [n] if n else [], k, state_bits)
    model = make_byte_model(model_name, order, min_match, memory_mb)
    encode_with(model, prime, state_bits)  # condition the adaptive model on the prime text
    return decode_with(model, noise, n, state_bits)


# ----------------------------------------------------------------------------- the experiment: a GRU on the standard library

def warmup_cosine(step, total, warmup=50):
    """Learning-rate multiplier: linear warm-up, then cosine decay to a tenth."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0))))


def train_model(model, text, args, device):
    """Adam on random windows of the training text; `--steps` optimizer steps."""
    data = torch.from_numpy(np.frombuffer(text, np.uint8).copy())
    if len(data) < args.seq_len + 2:
        raise RunError(f"the training text has {len(data)} bytes, fewer than --seq-len + 2")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, args.steps))
    offsets = torch.arange(args.seq_len + 1)
    progress = Progress(args.steps)
    model.train()
    for step in range(1, args.steps + 1):
        # Random windows of seq_len + 1 bytes: inputs x[:, :-1], targets x[:, 1:].
        start = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size, 1))
        window = data[start + offsets].long().to(device)      # (B, T + 1)
        logits, _ = model(window[:, :-1])                      # (B, T, V)
        loss = bits_per_byte_loss(logits, window[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:  # read the loss (a device sync) only here
            check_finite(step, loss=loss)
            progress.update(step, 50 * args.batch_size * args.seq_len, bits_per_byte=loss.item())
    return args.steps


@torch.no_grad()
def evaluate_bits(model, text, device, max_streams=256):
    """Teacher-forced -log2 P(text) in bits under the float model, with the
    coder's stream layout (what the ideal neural code length would be)."""
    model.eval()
    lengths = stream_layout(len(text), max_streams)
    if not lengths:
        return 0.0
    chunk = lengths[0]
    x = np.full((len(lengths), chunk), START, np.int64)
    x.reshape(-1)[:len(text)] = np.frombuffer(text, np.uint8)
    x = torch.from_numpy(x).to(device)                              # (B, L)
    inputs = torch.cat([torch.full_like(x[:, :1], START), x[:, :-1]], 1)
    valid = (torch.arange(chunk, device=device)[None] < torch.tensor(lengths, device=device)[:, None])
    bits = torch.zeros((), dtype=torch.float64, device=device)
    h = None
    for t in range(0, chunk, 512):
        logits, h = model(inputs[:, t:t + 512], h)
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, t:t + 512], reduction="none")
        bits += (nll * valid[:, t:t + 512]).sum().double() / math.log(2)
    return bits.item()


def run_train(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = prepare_out_dir(args.out)
    train_text, heldout = corpus(args.data_dir)
    test_text = heldout[:args.test_limit or None]
    if args.sample_only:
        model, _ = load_neural(args.ckpt, device)
        steps, train_seconds = 0, 0.0
    else:
        model = ByteGRU(args.hidden, args.embed).to(device)
        start = time.time()
        steps = train_model(model, train_text, args, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.time() - start
        save_checkpoint(out / "model.pt", model.state_dict(), vars(args))
        args.ckpt = str(out / "model.pt")
    bits = evaluate_bits(model, test_text, device, args.streams)
    part = test_text[:args.check_bytes]  # a real round trip through the container
    opts = coder_options(args)
    if decompress(compress(part, "neural", streams=args.streams, **opts), args.ckpt, args.device) != part:
        raise RunError("neural round trip failed")
    text = sample_bytes("neural", args.num_samples, args.seed, **opts)
    atomic_write(out / "samples.txt", lambda f: f.write(text))
    print("sample (decoded from random bits):\n" + text.decode("utf-8", "replace"))
    metrics = {"heldout_bits_per_byte": round(bits / max(len(test_text), 1), 4),
               "heldout_bytes": len(test_text),
               "heldout_neural_ideal_bytes": round(bits / 8),
               "heldout_zlib_9_bytes": len(zlib.compress(test_text, 9)),
               "heldout_xz_9e_bytes": len(lzma.compress(test_text, preset=9 | lzma.PRESET_EXTREME)),
               "roundtrip_bytes_checked": len(part),
               "train_bytes": len(train_text), "train_seconds": round(train_seconds, 1),
               "steps": steps, "device": str(device)}
    if not args.sample_only:
        write_metrics(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return metrics


# ----------------------------------------------------------------------------- main

COMMANDS = ("train", "compress", "decompress", "sample", "bench")
BYTE_MODELS = ("order0", "context", "neural")


def build_parser():
    fmt = argparse.ArgumentDefaultsHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    model_flags(common)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common], formatter_class=fmt,
                       help="train the neural model (the default command)")
    t.add_argument("--data-dir", default=str(stdlib_dir()), help="folder of .py files")
    t.add_argument("--out", default=f"runs/{SCRIPT}", help="output folder")
    t.add_argument("--steps", type=int, default=1400, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=256, help="bytes per training window")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--hidden", type=int, default=512, help="GRU units")
    t.add_argument("--embed", type=int, default=64, help="byte embedding size")
    t.add_argument("--num-samples", type=int, default=600, help="bytes to sample")
    t.add_argument("--test-limit", type=int, default=1_000_000,
                   help="evaluate on the first N held-out bytes (0: all)")
    t.add_argument("--check-bytes", type=int, default=20_000,
                   help="held-out bytes sent through compress + decompress as a check")
    t.add_argument("--sample-only", action="store_true", help="skip training: load --ckpt")
    c = sub.add_parser("compress", parents=[common], formatter_class=fmt)
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--model", choices=BYTE_MODELS, default="context")
    c.add_argument("--force", action="store_true", help="overwrite OUT")
    d = sub.add_parser("decompress", parents=[common], formatter_class=fmt)
    d.add_argument("input", metavar="IN")
    d.add_argument("output", metavar="OUT")
    d.add_argument("--force", action="store_true", help="overwrite OUT")
    d.add_argument("--max-size", type=int, help="refuse an archive that decodes to more bytes")
    s = sub.add_parser("sample", parents=[common], formatter_class=fmt,
                       help="decode random bits: an exact sample of the model")
    s.add_argument("--model", choices=BYTE_MODELS, default="neural")
    s.add_argument("--num-samples", type=int, default=400, help="bytes to sample")
    s.add_argument("--prime", help="order0/context: text the adaptive model reads first")
    bench_flags(sub.add_parser("bench", parents=[common], formatter_class=fmt))
    return p


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train"] + argv  # the default run trains the neural model
    p = build_parser()
    reject_renamed(p, argv, {"--precision": "--state-bits"})
    args = p.parse_args(argv)
    models = {"train": ["neural"], "compress": [args.__dict__.get("model")], "decompress": [],
              "sample": [args.__dict__.get("model")]}.get(args.command)
    if args.command == "bench":
        models = [m for m in args.models.split(",") if m]
        if not models or any(m not in BYTE_MODELS for m in models):
            p.error("--models is a comma-separated list of order0, context, neural")
        check_flags(p, args, positive=("limit",), nonnegative=("ref_limit", "offset"))
    if args.command == "train":
        if args.sample_only and not args.ckpt:
            p.error("--sample-only needs --ckpt PATH")
        check_flags(p, args, positive=("steps", "batch_size", "seq_len", "lr", "hidden", "embed"),
                    nonnegative=("num_samples", "test_limit", "check_bytes"))
    if args.command == "sample":
        check_flags(p, args, nonnegative=("num_samples",))
    if args.command == "decompress":
        check_flags(p, args, nonnegative=("max_size",))
    if args.command != "decompress" and not 20 <= args.state_bits <= 62:
        p.error("--state-bits must be in [20, 62] (the context model's totals reach 2^17)")
    check_model_flags(p, args, models)
    return args


def run(args):
    if args.command == "train":
        return run_train(args)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "sample":
        prime = read_input(args.prime) if args.prime else b""
        text = sample_bytes(args.model, args.num_samples, args.seed, prime, **coder_options(args))
        print(text.decode("utf-8", "replace"))
        return text
    data = read_input(args.input)
    start = time.perf_counter()
    if args.command == "compress":
        result = compress(data, args.model, streams=args.streams, **coder_options(args))
    else:
        result = decompress(data, args.ckpt or DEFAULT_CKPT, args.device, args.max_size, args.input)
    write_output(args.output, result, args.force)
    info = {"command": args.command, "in_bytes": len(data), "out_bytes": len(result),
            "seconds": round(time.perf_counter() - start, 3)}
    print(json.dumps(info))
    return info


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        sys.exit(f"error: {e}")


# ============================================================================ appendix: plumbing every script repeats

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


# ============================================================================ the archive format
#
# The container's bytes, as laid out above `compress`. Nothing read from a file
# is used before it is checked: each header field's type and range, the
# agreement between fields, and whether the payload can hold the length the
# header claims. A neural archive also carries the fingerprint of the kernels
# that computed its tables, checked before decoding.

MAGIC, VERSION, READS = b"ACPY", 3, (2, 3)  # 3: state_bits, fingerprint, memory budget, stored mode
MAX_HEADER = 1 << 16
STORED_OVERHEAD = 50  # bytes of container around a stored input, at most


def pack_archive(header, body):
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head = MAGIC + bytes([VERSION]) + struct.pack(">I", len(text)) + text
    return head + struct.pack(">I", zlib.crc32(head)) + body


def pack_coded(spec, data, payloads):
    body = b"".join(payloads)
    return pack_archive(dict(spec, length=len(data), crc32=zlib.crc32(data),
                             streams=[len(p) for p in payloads], payload_crc32=zlib.crc32(body)), body)


def pack_stored(data):
    """Stored mode: the input as it is, behind at most STORED_OVERHEAD bytes of container
    (its length is the payload's: 13 container bytes + at most 37 of header)."""
    return pack_archive({"model": "stored", "crc32": zlib.crc32(data)}, data)


def unpack_archive(blob, name="archive"):
    """-> (header dict, payloads), or a one-line RunError saying what is wrong."""
    if blob[:4] != MAGIC:
        raise RunError(f"{name} is not an {SCRIPT} archive (it does not start with {MAGIC!r})")
    if len(blob) < 9:
        raise RunError(f"{name} is truncated (it ends inside the header)")
    if blob[4] not in READS:
        raise RunError(f"{name} has format version {blob[4]}; this script reads versions "
                       f"{' and '.join(map(str, READS))}")
    size = struct.unpack(">I", blob[5:9])[0]
    if size > MAX_HEADER:
        raise RunError(f"{name}: its header claims {size} bytes, more than {MAX_HEADER}")
    end = 9 + size
    if len(blob) < end + 4:
        raise RunError(f"{name} is truncated (it ends inside the header)")
    if zlib.crc32(blob[:end]) != struct.unpack(">I", blob[end:end + 4])[0]:
        raise RunError(f"{name} is damaged: its header fails the CRC check")
    try:
        header = json.loads(blob[9:end])
    except (ValueError, RecursionError):
        raise RunError(f"{name} has a header that is not valid JSON") from None
    body = blob[end + 4:]
    header = check_header(header, blob[4], len(body), name)
    streams = header.get("streams", [header["length"]])
    if len(body) != sum(streams):
        raise RunError(f"{name} is truncated or has bytes appended: payload is {len(body)} bytes, "
                       f"the header says {sum(streams)}")
    if zlib.crc32(body) != header.get("payload_crc32", header["crc32"]):
        raise RunError(f"{name} is damaged: its payload fails the CRC check")
    offsets = np.cumsum([0] + streams).tolist()
    return header, [body[a:b] for a, b in zip(offsets, offsets[1:])]


U32 = (0, (1 << 32) - 1)
FIELDS = {  # name: (type, smallest, largest)
    "length": (int, 0, 1 << 48), "crc32": (int, *U32), "payload_crc32": (int, *U32),
    "state_bits": (int, 20, 62), "order": (int, 0, MAX_ORDER), "min_match": (int, 1, MAX_MIN_MATCH),
    "memory_mb": (int, 0, 1 << 20), "k": (int, 8, 60), "chunk": (int, 1, 1 << 48),
    "ckpt_sha256": (str, 64, 64), "streams": (list, 0, MAX_STREAMS), "fingerprint": (dict, 4, 4)}
CODED = ("length", "crc32", "payload_crc32", "state_bits", "streams")
NEEDS = {"stored": ("crc32",), "order0": CODED,
         "context": CODED + ("order", "min_match", "memory_mb"),
         "neural": CODED + ("k", "chunk", "ckpt_sha256", "fingerprint")}
# The most probable symbol each model can code, P <= 1 - 1/d: it bounds how
# many symbols a payload of n bytes can hold (see most_symbols).
LEAST_ODDS = {"order0": 65536 / 255, "context": 1024}


def check_field(header, key, name):
    kind, lo, hi = FIELDS[key]
    value = header.get(key)
    if type(value) is not kind:
        raise RunError(f"{name}: header field {key!r} is {str(value)[:40]!r}, not a {kind.__name__}")
    size = value if kind is int else len(value)
    if not lo <= size <= hi:
        raise RunError(f"{name}: header field {key!r} is out of range ({lo} to {hi})")


def from_version_2(header):
    """A version-2 header in version-3 terms: `precision` was the state width, the
    context model had no memory budget, neural archives had no fingerprint."""
    header = dict(header)
    if "precision" in header:
        header["state_bits"] = header.pop("precision")
    if header.get("model") == "context":
        header.setdefault("memory_mb", 0)
    if header.get("model") == "neural":
        header["chunk"] = header.get("chunk") or 1  # version 2 wrote 0 for empty input
        header.setdefault("fingerprint", {"torch": None, "device": header.get("device"),
                                          "kernel": None, "probe_sha256": None})
    return header


def check_header(header, version, body_bytes, name):
    """Type and range of every field the model needs, and their agreement."""
    if not isinstance(header, dict) or header.get("model") not in NEEDS:
        model = header.get("model") if isinstance(header, dict) else None
        raise RunError(f"{name}: unknown model {str(model)[:40]!r} in its header")
    if version == 2:
        header = from_version_2(header)
    for key in NEEDS[header["model"]]:
        check_field(header, key, name)
    if header["model"] == "stored":
        header["length"] = body_bytes
    kind, streams = header["model"], header.get("streams", [body_bytes])
    if not all(type(s) is int and 0 <= s <= 1 << 48 for s in streams):
        raise RunError(f"{name}: header field 'streams' holds something other than payload sizes")
    if kind in ("order0", "context") and len(streams) != 1:
        raise RunError(f"{name}: header says {len(streams)} streams, model {kind} codes 1")
    if kind == "neural":
        if header["k"] > header["state_bits"] - 2:
            raise RunError(f"{name}: header field 'k' must be at most state_bits - 2")
        if len(streams) != -(-header["length"] // header["chunk"]):
            raise RunError(f"{name}: header says {len(streams)} streams for "
                           f"{header['length']} bytes in chunks of {header['chunk']}")
        if version == 3 and not all(type(header["fingerprint"].get(k)) is str
                                    for k in ("torch", "device", "kernel", "probe_sha256")):
            raise RunError(f"{name}: header field 'fingerprint' is malformed")
    return header


def most_symbols(payload_bytes, least_odds, state_bits):
    """The most symbols a real stream of n bytes can decode to. Each symbol has
    P <= 1 - 1/d (+ 2^-(state_bits - 2) from rounding), and the decoder reads
    more than -log2 P(x) - 2 bits, at most 8 n of them: N < (8 n + 2) / bits."""
    p = min(1.0 - 1.0 / least_odds + 2.0 ** (2 - state_bits), 1 - 1e-15)
    return int((8 * payload_bytes + 2) / -math.log2(p)) + 1


def check_length(header, payloads, max_size, name):
    """Refuse, before decoding, a length the user capped or the payload cannot hold."""
    n, kind = header["length"], header["model"]
    if max_size is not None and n > max_size:
        raise RunError(f"{name} would decode to {n} bytes, more than --max-size {max_size}")
    if kind == "stored":
        return
    if kind == "neural":
        odds = 2 ** header["k"] / 255
        lengths = stream_layout(n, MAX_STREAMS, header["chunk"])
    else:
        odds, lengths = LEAST_ODDS[kind], [n]
    for m, payload in zip(lengths, payloads):
        if m > most_symbols(len(payload), odds, header["state_bits"]):
            raise RunError(f"{name} is damaged or crafted: a payload of {len(payload)} bytes "
                           f"cannot hold the {m} bytes its header claims")


PROBE = b"import os\n\ndef main(argv=None):\n    return 0\n"  # the fingerprint's fixed input


def kernel_fingerprint(model, device, n_streams, k):
    """What decides the quantised tables: torch, the device, the kernel path and
    a hash of the tables themselves on a fixed probe run with the archive's own
    stream count (kernels are chosen by shape). Thread count does not enter."""
    digest = hashlib.sha256()

    def code_step(t, probs, cum):
        digest.update(cum.tobytes())
        return np.frombuffer(PROBE, np.uint8)[(t + np.arange(n_streams)) % len(PROBE)]

    neural_lockstep(model, device, [len(PROBE)] * n_streams, k, code_step)
    if device.type == "cuda":
        kernel = f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    else:
        kernel = torch.backends.cpu.get_cpu_capability()
    return {"torch": torch.__version__, "device": device.type, "kernel": kernel,
            "probe_sha256": digest.hexdigest()[:32]}


def check_fingerprint(made, here, name):
    """Refuse, before decoding, an archive whose tables this machine would not reproduce."""
    differ = [f"{key} {made.get(key)} there, {here[key]} here"
              for key in ("torch", "device", "kernel", "probe_sha256") if made.get(key) != here[key]]
    if differ:
        raise RunError(f"{name} cannot be decoded here: its neural tables were computed otherwise "
                       f"({'; '.join(differ)}); decode it where torch {made.get('torch')} runs "
                       f"the {made.get('kernel')} kernels on {made.get('device')}")


# ============================================================================ the training text
#
# The neural model learns from Python source: every .py file of a folder (by
# default the running interpreter's standard library), split by file.

def stdlib_dir():
    return Path(sysconfig.get_paths()["stdlib"])


def corpus(root):
    """(train bytes, held-out bytes): every .py file under root (site-packages
    excepted), split by a hash of its relative path: 1 file in 20 is held out."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"--data-dir {root} is not a folder")
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    if not files:
        raise RunError(f"no .py files under {root}; --data-dir must be a folder of Python "
                       f"source (the default is the running interpreter's {stdlib_dir()})")
    train, heldout = [], []
    for p in files:
        held = zlib.crc32(p.relative_to(root).as_posix().encode()) % 20 == 0
        (heldout if held else train).append(p.read_bytes())
    if not train or not heldout:
        raise RunError(f"{root} holds too few .py files for a train/held-out split")
    return b"".join(train), b"".join(heldout)


# ============================================================================ command-line helpers
#
# What main's parser and run() call: the flags shared by the models, each model's
# checks where it is used, and the files named on the command line.

def model_flags(parser):
    """Flags of the coder and the models (each is checked only where its model is used)."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state-bits", type=int, default=32,
                        help="bits of the coder's state, 20 to 62 (was --precision)")
    parser.add_argument("--ckpt", help=f"neural: model.pt (default {DEFAULT_CKPT})")
    parser.add_argument("--k", type=int, default=24, help="neural: frequencies sum to 2^k")
    parser.add_argument("--streams", type=int, default=256,
                        help=f"neural: most streams coded in lock-step (each >= 4096 bytes), <= {MAX_STREAMS}")
    parser.add_argument("--order", type=int, default=10, help=f"context: longest PPM context, <= {MAX_ORDER}")
    parser.add_argument("--min-match", type=int, default=64,
                        help=f"context: bytes of context the match model looks up, <= {MAX_MIN_MATCH}")
    parser.add_argument("--memory-mb", type=int, default=1024,
                        help="context: memory budget of its tables (counted by the model; past it the "
                             "model starts afresh, identically when decoding); 0: none")


def check_model_flags(p, args, models):
    """Each model's flags, only where that model is used."""
    if "neural" in models:
        if not 8 <= args.k <= args.state_bits - 2:
            p.error(f"--k must be in [8, state-bits - 2] (got {args.k})")
        if not 1 <= args.streams <= MAX_STREAMS:
            p.error(f"--streams must be in [1, {MAX_STREAMS}] (got {args.streams})")
    if "context" in models:
        if not 0 <= args.order <= MAX_ORDER:
            p.error(f"--order must be in [0, {MAX_ORDER}] (got {args.order})")
        if not 1 <= args.min_match <= MAX_MIN_MATCH:
            p.error(f"--min-match must be in [1, {MAX_MIN_MATCH}] (got {args.min_match})")
        check_flags(p, args, nonnegative=("memory_mb",))


def coder_options(args):
    """The coder's and the models' flags as keyword arguments of compress and sample_bytes."""
    return dict(state_bits=args.state_bits, order=args.order, min_match=args.min_match,
                memory_mb=args.memory_mb, ckpt=args.ckpt or DEFAULT_CKPT, device=args.device, k=args.k)


def read_input(path):
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise RunError(f"cannot read {path}: {e.strerror or e}") from None


def write_output(path, data, force):
    if Path(path).exists() and not force:
        raise RunError(f"{path} exists; pass --force to overwrite it")
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None


# ============================================================================ the PPM context model
#
# The default model of `compress`: stronger on text than order 0, but long and
# full of engineering (exclusions, learned escapes, a match model, a memory
# budget). The method is the same: a model of P(x_t | x_<t) fed to the coder.

# Kind of a byte for the escape classes: 0 blank, 1 newline, 2 word (letters, digits, _), 3 other.
BYTE_KIND = [0 if b in b" \t" else 1 if b == 10 else 2 if chr(b).isalnum() or b == 95 else 3
             for b in range(256)]
# The model's own count of its memory, in bytes (CPython 3.11 sizes, measured):
NODE_BYTES = 150    # one context: its integer key, its dict slot, a small bytearray
PAIR_BYTES = 2      # one (byte, count) pair inside a context's bytearray
MATCH_BYTES = 110   # one match-table entry: a 64-bit hash key, a position, its dict slot


def match_hash(window):
    """A 64-bit hash of the match model's context (deterministic, unlike hash())."""
    return zlib.crc32(window) | zlib.adler32(window) << 32


class ContextModel:
    """PPM with full exclusion, update exclusion, SEE, a match model and a memory budget.

    The longest context of the last `order` bytes that has been seen predicts
    first. In a context whose candidate bytes have counts c_s (d of them):
        P(x in this context) = q,       P(s | in it) = (2 c_s - 1) / sum_s' (2 c_s' - 1)
    and 1 - q escapes to the next shorter context, with the bytes already ruled
    out excluded. PPM method D would fix q = 1 - d / sum(2 c_s); here q is
    learned (secondary escape estimation, SEE, as in PPMZ/PPMd): contexts are
    grouped into classes (order, d, total count, exclusions or not, kinds of the
    last two bytes) and each class counts how often the byte was there. Below
    order 0 a uniform order -1 ends the chain. Only the contexts from the order
    that coded the byte upwards are updated (update exclusion; Cleary & Witten
    1984, Moffat 1990).

    In front of PPM, a match model (as in LZP and lpaq) finds the last time the
    previous `min_match` bytes occurred and predicts the byte that followed then;
    a binary event "the predicted byte comes next" is coded with counts kept per
    class of match length and PPM agreement; on a miss PPM codes the byte with
    it excluded.

    Memory: a context is a bytearray of (byte, count) pairs in insertion order
    (counts <= limit < 255), keyed by the context as an integer; the match table
    maps a 64-bit hash to a position. The model counts its own bytes (`used`);
    past `memory_mb` MB it forgets its tables and starts afresh, as PPMd does,
    at the same symbol in encoder and decoder (0: no budget)."""

    def __init__(self, order=10, limit=250, min_match=64, memory_mb=1024):
        if not 1 <= limit <= 254:
            raise ValueError("limit must fit a byte with room for one more count")
        self.order, self.limit, self.min_match = order, limit, min_match
        self.budget = memory_mb << 20
        self.masks = [(1 << (8 * k)) - 1 for k in range(order + 1)]
        self.history = 0                  # the last `order` bytes as one integer
        self.match_counts = {}            # match class -> [hits, misses]
        self.see_counts = {}              # context class -> [present, escaped]
        self.resets = 0
        self._forget()

    def _forget(self):
        """Empty tables (at the start, and when the memory budget is spent)."""
        self.tables = [{} for _ in range(self.order + 1)]  # tables[k][last k bytes] -> pairs
        self.data = bytearray()           # everything seen since, for the match model
        self.match_table = {}             # hash of min_match bytes -> position after them
        self.match_ptr = self.match_len = 0
        self.used = 0

    def entries(self):
        """(contexts, pairs, match entries) held now: what `used` counts."""
        nodes = sum(len(t) for t in self.tables)
        pairs = sum(len(node) // 2 for t in self.tables for node in t.values())
        return nodes, pairs, len(self.match_table)

    @staticmethod
    def _find(node, x):
        """Index of byte x among the pairs of node (even positions), or -1."""
        i = node.find(x)
        while i > 0 and i & 1:
            i = node.find(x, i + 1)
        return i

    def _candidates(self, node, excluded):
        """[(byte, 2c - 1)] of a context node, minus excluded bytes; insertion order."""
        if not excluded:
            return [(s, 2 * c - 1) for s, c in zip(node[0::2], node[1::2])]
        return [(s, 2 * c - 1) for s, c in zip(node[0::2], node[1::2]) if s not in excluded]

    def _predicted(self):
        """(predicted byte, its [hits, misses] counts) or (None, None) without a match.

        The counts are kept per class: log2 of how far the match has run past
        min_match, and what the longest PPM context says of the guess (no such
        context / never seen there / seen once / seen more)."""
        if not self.match_len:
            return None, None
        guess = self.data[self.match_ptr]
        node = self.tables[self.order].get(self.history)
        if node is None:
            c = -1
        else:
            i = self._find(node, guess)
            c = node[i + 1] if i >= 0 else 0
        key = (min((self.match_len - self.min_match).bit_length(), 15), min(c, 2))
        bucket = self.match_counts.get(key)
        if bucket is None:
            bucket = self.match_counts[key] = [1, 1]
        return guess, bucket

    def encode(self, enc, x):
        guess, bucket = self._predicted()
        excluded = set()
        if guess is not None:
            hits, misses = bucket
            enc.encode_bit(x != guess, hits, hits + misses)
            if x == guess:
                return self._update(x, 0, bucket)
            excluded.add(guess)
        h, found, events = self.history, -1, []
        for k in range(self.order, -1, -1):
            node = self.tables[k].get(h & self.masks[k])
            cands = self._candidates(node, excluded) if node is not None else None
            if not cands:
                continue
            # First a binary event, "x is one of this context's candidates", with
            # odds learned per class (SEE); then which one, by counts. If the
            # candidates are all the bytes not excluded, x is among them.
            present = x not in excluded and self._find(node, x) >= 0
            if len(cands) + len(excluded) < 256:
                odds = self._escape_odds(k, cands, node)
                events.append((odds, present))
                enc.encode_bit(not present, odds[0], odds[0] + odds[1])
                if not present:  # escape
                    excluded.update(node[0::2])
                    continue
            if len(cands) > 1:
                lo = 0
                for s, f in cands:
                    if s == x:
                        break
                    lo += f
                enc.encode(lo, lo + f, sum(f for _, f in cands))
            found = k
            break
        else:  # order -1: uniform over the byte values not excluded
            rank = x - sum(1 for s in excluded if s < x)
            enc.encode(rank, rank + 1, 256 - len(excluded))
        self._update(x, found, bucket, events)

    def decode(self, dec):
        guess, bucket = self._predicted()
        excluded = set()
        if guess is not None:
            hits, misses = bucket
            if not dec.decode_bit(hits, hits + misses):
                self._update(guess, 0, bucket)
                return guess
            excluded.add(guess)
        h, found, events = self.history, -1, []
        for k in range(self.order, -1, -1):
            node = self.tables[k].get(h & self.masks[k])
            cands = self._candidates(node, excluded) if node is not None else None
            if not cands:
                continue
            if len(cands) + len(excluded) < 256:
                odds = self._escape_odds(k, cands, node)
                present = not dec.decode_bit(odds[0], odds[0] + odds[1])
                events.append((odds, present))
                if not present:
                    excluded.update(node[0::2])
                    continue
            x = cands[0][0]
            if len(cands) > 1:
                cum = [0]
                for _, f in cands:
                    cum.append(cum[-1] + f)
                x = cands[dec.decode_symbol(cum)][0]
            found = k
            break
        else:
            rank = dec.target(256 - len(excluded))
            x = [s for s in range(256) if s not in excluded][rank]
            dec.consume(rank, rank + 1, 256 - len(excluded))
        self._update(x, found, bucket, events)
        return x

    def _escape_odds(self, k, cands, node):
        """[present, escaped] counts shared by the contexts of one class: order k,
        number of candidates d, their total count, whether exclusions removed any,
        and the kinds of the last two bytes (blank, newline, word, punctuation)."""
        d, n = len(cands), sum(f for _, f in cands)
        key = (k, min(d, 7), min(n, 31) if d == 1 else 32 + min(n.bit_length(), 12),
               len(node) // 2 == d, BYTE_KIND[self.history & 255], BYTE_KIND[(self.history >> 8) & 255])
        odds = self.see_counts.get(key)
        if odds is None:
            odds = self.see_counts[key] = [1, 1]
        return odds

    def _update(self, x, found, bucket, events=()):
        """Learn from byte x, coded by PPM order `found` (-1: order -1), or by the
        match model (found = 0 and a hit: PPM then updates its order-0 upwards)."""
        if bucket is not None:
            events = list(events) + [(bucket, x == self.data[self.match_ptr])]
        for b, hit in events:
            b[0 if hit else 1] += 1
            if b[0] + b[1] > 1024:
                b[0], b[1] = (b[0] + 1) // 2, (b[1] + 1) // 2
        self._update_contexts(x, found)
        self._update_match(x)
        if self.budget and self.used > self.budget:
            self.resets += 1
            self._forget()

    def _update_contexts(self, x, found):
        h = self.history
        for k in range(max(found, 0), self.order + 1):
            key = h & self.masks[k]
            node = self.tables[k].get(key)
            if node is None:
                self.tables[k][key] = bytearray((x, 1))
                self.used += NODE_BYTES + PAIR_BYTES
                continue
            i = self._find(node, x)
            if i < 0:
                node += bytes((x, 1))
                self.used += PAIR_BYTES
            elif node[i + 1] < self.limit:
                node[i + 1] += 1
            else:  # halve: old statistics fade, counts stay small
                node[i + 1] += 1
                node[1::2] = bytes((c + 1) // 2 for c in node[1::2])
        self.history = ((h << 8) | x) & self.masks[self.order]

    def _update_match(self, x):
        """Extend the current match, or look the context up afresh."""
        data = self.data
        data.append(x)
        self.used += 1
        if self.match_len and data[self.match_ptr] == x:
            self.match_len += 1
            self.match_ptr += 1
        else:
            self.match_len = 0
        m = self.min_match
        if len(data) >= m:
            key = match_hash(data[-m:])
            if not self.match_len:
                ptr = self.match_table.get(key, 0)
                if ptr:
                    self.match_ptr, self.match_len = ptr, m
            if key not in self.match_table:
                self.used += MATCH_BYTES
            self.match_table[key] = len(data)


# ============================================================================ the benchmark
#
# Archive against archive: our container (header, CRCs and all) against the whole
# files of zlib -9, bzip2 -9 and xz -9e, on held-out Python source.

class MeasuringEncoder(ArithmeticEncoder):
    """An encoder that also adds up the ideal code length sum -log2(f / total)
    of the integer model it is fed (for bench and tests; slower)."""

    def __init__(self, state_bits=32):
        super().__init__(state_bits)
        self.ideal_bits = 0.0

    def encode(self, low_count, high_count, total):
        self.ideal_bits -= math.log2((high_count - low_count) / total)
        super().encode(low_count, high_count, total)


def bench_flags(b):
    b.add_argument("files", nargs="*", help="files to bench (default: held-out stdlib text)")
    b.add_argument("--data-dir", default=str(stdlib_dir()))
    b.add_argument("--limit", type=int, default=1_000_000, help="bytes of held-out text")
    b.add_argument("--offset", type=int, default=0,
                   help="skip this many held-out bytes first (1000000: text the context model "
                        "was not tuned on)")
    b.add_argument("--models", default="order0,context,neural")
    b.add_argument("--ref-limit", type=int, default=100_000,
                   help="bytes for the side-by-side of the textbook and the fast coder")
    b.add_argument("--out", default=f"runs/{SCRIPT}", help="where bench.md and bench.json go")


def bench_model(name, data, args):
    """One row: ideal bits, archive bytes, overhead, encode / decode MB/s, checked round trip."""
    measure = {}
    t0 = time.perf_counter()
    blob = compress(data, name, streams=args.streams, measure=measure, **coder_options(args))
    t1 = time.perf_counter()
    back = decompress(blob, args.ckpt or DEFAULT_CKPT, args.device)
    t2 = time.perf_counter()
    if back != data:
        raise RunError(f"{name}: round trip failed")
    mb = len(data) / 1e6
    row = {"model": name, "stored": measure["stored"], "ideal_bits": round(measure["quantised_bits"], 1),
           "ideal_bytes": round(measure["quantised_bits"] / 8), "archive_bytes": len(blob),
           "overhead_bits": round(8 * len(blob) - measure["quantised_bits"], 1),
           "bits_per_byte": round(8 * len(blob) / max(len(data), 1), 4),
           "encode_MB_per_s": round(mb / (t1 - t0), 4), "decode_MB_per_s": round(mb / (t2 - t1), 4)}
    if "float_bits" in measure:
        row["float_ideal_bits"] = round(measure["float_bits"], 1)
        row["quantisation_loss_percent"] = round(
            100 * (measure["quantised_bits"] / measure["float_bits"] - 1), 4)
    return row


def textbook_side_by_side(part):
    """Order 0 through the textbook coder and the fast one: same bytes? how fast?"""
    t0 = time.perf_counter()
    ref, _ = encode_with(Order0Model(), part, 32, TextbookEncoder(32))
    t1 = time.perf_counter()
    model, dec = Order0Model(), TextbookDecoder(ref, 32)
    back = bytes(model.decode(dec) for _ in range(len(part)))
    t2 = time.perf_counter()
    ours, _ = encode_with(Order0Model(), part)
    t3 = time.perf_counter()
    decode_with(Order0Model(), ours, len(part))
    t4 = time.perf_counter()
    if back != part:
        raise RunError("the textbook coder failed its own round trip")
    mb = len(part) / 1e6
    return {"bytes": len(part), "same_output": ref == ours,
            "textbook_encode_MB_per_s": round(mb / (t1 - t0), 4),
            "textbook_decode_MB_per_s": round(mb / (t2 - t1), 4),
            "fast_encode_MB_per_s": round(mb / (t3 - t2), 4),
            "fast_decode_MB_per_s": round(mb / (t4 - t3), 4)}


def bench_table(results):
    lines = ["| input | bytes | coder | archive bytes | bits/byte | ideal bytes | overhead bits "
             "| enc MB/s | dec MB/s |", "|" + " --- |" * 9]
    for e in results:
        for r in e["models"]:
            lines.append(f"| {e['file']} | {e['bytes']} | {r['model']}{' (stored)' if r['stored'] else ''} "
                         f"| {r['archive_bytes']} | {r['bits_per_byte']} | {r['ideal_bytes']} | "
                         f"{r['overhead_bits']} | {r['encode_MB_per_s']} | {r['decode_MB_per_s']} |")
        for tool in ("zlib_9", "bz2_9", "xz_9e"):
            size = e[f"{tool}_bytes"]
            lines.append(f"| {e['file']} | {e['bytes']} | {tool} | {size} | "
                         f"{8 * size / max(e['bytes'], 1):.4f} | | | | |")
        s = e.get("order0_side_by_side")
        if s:
            for kind in ("textbook", "fast"):
                lines.append(f"| first {s['bytes']} bytes | {s['bytes']} | order0, {kind} coder "
                             f"(same bytes: {s['same_output']}) | | | | | "
                             f"{s[kind + '_encode_MB_per_s']} | {s[kind + '_decode_MB_per_s']} |")
    return "\n".join(lines)


def run_bench(args):
    if args.files:
        files = [(f, read_input(f)) for f in args.files]
    else:
        _, heldout = corpus(args.data_dir)
        part = heldout[args.offset:args.offset + args.limit]
        files = [(f"stdlib held-out .py, bytes {args.offset} to {args.offset + len(part)}", part)]
    models = [m for m in args.models.split(",") if m]
    results = []
    for fname, data in files:
        entry = {"file": fname, "bytes": len(data),
                 "zlib_9_bytes": len(zlib.compress(data, 9)),
                 "bz2_9_bytes": len(bz2.compress(data, 9)),
                 "xz_9e_bytes": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
                 "models": []}
        for m in models:
            print(f"bench: {fname}: {m} ...", flush=True)
            entry["models"].append(bench_model(m, data, args))
        if data[:args.ref_limit] and "order0" in models:
            entry["order0_side_by_side"] = textbook_side_by_side(data[:args.ref_limit])
        results.append(entry)
    table = bench_table(results)
    print(table)
    out = prepare_out_dir(args.out)
    atomic_write(out / "bench.md", lambda f: f.write((table + "\n").encode()))
    write_metrics(out / "bench.json", results)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
