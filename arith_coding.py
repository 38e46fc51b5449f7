"""Arithmetic coding: a model's P(x) becomes a file within two bits of -log2 P(x).

Knowing P(x) gives the best lossless code: about -log2 P(x) bits. Arithmetic
coding gets there for a whole sequence: split [0, 1) by the CDF, one symbol at a
time, and send the shortest binary fraction inside the final interval

    [ P(X < x), P(X <= x) ),    width  P(x) = prod_t P(x_t | x_<t).

An autoregressive model gives exactly the conditionals P(x_t | x_<t) the coder
needs, in order, so every autoregressive model is a compressor ("fancy gzip"):
the decoder replays the same model on the bytes it has decoded so far.

Parts, top to bottom:
  * the coder: integer arithmetic coding with a `precision`-bit state (32 by
    default), underflow (pending-bit) handling, bit output, and a decoder that
    mirrors the encoder step for step (Witten, Neal & Cleary, CACM 1987);
  * quantise(): float probabilities -> integer frequencies summing to 2^k, each
    >= 1, so that a symbol the model calls impossible can still be coded;
  * three models of P(x_t | x_<t) over bytes:
      order0  - adaptive counts (a Fenwick tree keeps the cumulative table);
      context - PPM, orders 10..0 then uniform, with full exclusion, update
                exclusion and learned escape odds (Cleary & Witten 1984;
                Moffat 1990; Bloom's PPMZ), plus a long-match predictor in
                front of it (as in LZP / lpaq);
      neural  - a byte-level GRU trained here on the standard library's .py
                files; B streams are coded in lock-step, one byte of each per
                model call, so that encoder and decoder run the same code on
                tensors of the same shape (float results that differ in the
                last bit would desynchronise the decoder);
  * a container: magic, version, model spec, length, CRC32s; every failure is
    one line and a non-zero exit, and OUT is written atomically.

Shape legend: B parallel streams (or batch), T time steps, V = 256 byte values,
H hidden units.

Run:   python arith_coding.py                     (= train: about 10 minutes on a 2-core CPU)
       python arith_coding.py compress IN OUT --model context
       python arith_coding.py decompress OUT IN.copy
       python arith_coding.py sample --model neural --num-samples 400
       python arith_coding.py bench               (table: ideal bits, actual bytes, zlib/bz2/xz, MB/s)
train writes runs/arith_coding/: model.pt, metrics.json (held-out bits per byte,
compressed sizes against zlib/xz) and samples.txt (decoded from random bits).
Neural archives need the model.pt they were made with (--ckpt, default as above),
and the same kind of device and thread count.

Measured on this 2-core CPU (bench, first 1,000,000 bytes of held-out stdlib .py):
  order0   580,121 bytes   0.57 / 0.44 MB/s enc/dec  (reference-style naive coder 0.095 / 0.091)
  context  176,898 bytes   1.415 bits/byte, 0.11 / 0.11 MB/s  (orders 10..0, min_match 64;
           orders 5..0, min_match 20: 188,274 bytes at 0.16 / 0.15 MB/s)
  neural   212,909 bytes   1.703 bits/byte (default train: 1400 steps, 523 s), 0.086 / 0.082 MB/s
  zlib -9  215,226    bzip2 -9  188,337    xz -9e  181,544
Coder overhead 4-8 bits per stream; quantisation loss of the neural model 0.0004 %.
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
HERE = Path(__file__).resolve().parent


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


# ----------------------------------------------------------------------------- the coder
#
# The interval [low, high] holds `precision`-bit integers; it stands for the
# real interval [low, high + 1) * 2^-precision, seen through the bits already
# sent. Between calls the coder keeps two invariants:
#   (I1) low < HALF <= high           (the leading bits differ: nothing to send)
#   (I2) not (QUARTER <= low and high < 3 QUARTER)   (no underflow pending)
# together: range = high - low + 1 > QUARTER. A symbol with frequency f >= 1 out
# of `total` <= QUARTER therefore always gets a non-empty sub-interval, of width
# floor(range * high_count / total) - floor(range * low_count / total) >= 1.

class ArithmeticEncoder:
    """encode(low_count, high_count, total): code the symbol whose cumulative
    frequencies are [low_count, high_count) out of `total`; finish() -> bytes.

    Contract: 0 <= low_count < high_count <= total <= 2^(precision - 2).
    Code length: at most -log2 prod_t (f_t / total_t) + 2 bits, plus the
    truncation of each sub-interval (< total/(QUARTER f) relative, tiny at 32
    bits), plus the zero padding to a whole byte."""

    def __init__(self, precision=32):
        if precision < 4:
            raise ValueError("precision must be at least 4 bits")
        self.precision = precision
        self.mask = (1 << precision) - 1
        self.half = 1 << (precision - 1)
        self.quarter = 1 << (precision - 2)
        self.low, self.high = 0, self.mask
        self.pending = 0            # underflow steps whose bit is not known yet
        self.acc, self.nacc = 0, 0  # bits waiting to fill whole bytes
        self.out = bytearray()

    def _emit(self, bits, n):
        """Append the n-bit integer `bits` to the output, whole bytes at a time."""
        acc = (self.acc << n) | bits
        nacc = self.nacc + n
        if nacc >= 64:
            r = nacc & 7
            self.out += (acc >> r).to_bytes((nacc - r) >> 3, "big")
            acc &= (1 << r) - 1
            nacc = r
        self.acc, self.nacc = acc, nacc

    def encode(self, low_count, high_count, total):
        low = self.low
        if not 0 <= low_count < high_count <= total <= self.quarter:
            raise ValueError(f"bad interval [{low_count}, {high_count}) of {total}")
        rng = self.high - low + 1
        # New interval: the symbol's slice of [low, high]; integer division
        # rounds both ends down, exactly as the decoder will.
        high = low + rng * high_count // total - 1
        low = low + rng * low_count // total
        p = self.precision
        # E1/E2 scaling, all steps at once: the n leading bits where low and high
        # agree are settled. Send them; the first one releases the pending bits,
        # which are its opposite (an underflow resolved towards it).
        n = p - (low ^ high).bit_length()
        if n:
            top = low >> (p - n)
            k = self.pending
            if k:
                first = top >> (n - 1)
                follow = 0 if first else (1 << k) - 1
                bits = (((first << k) | follow) << (n - 1)) | (top & ((1 << (n - 1)) - 1))
                self._emit(bits, n + k)
                self.pending = 0
            else:
                self._emit(top, n)
            low = (low << n) & self.mask
            high = ((high << n) & self.mask) | ((1 << n) - 1)
        # E3 scaling (underflow), all steps at once: while low = 01... and
        # high = 10..., drop the second bit of both and remember one pending bit.
        # After it (I1) and (I2) hold again.
        half = self.half
        if low & self.quarter and not high & self.quarter:
            rest = half - 1
            k = min(p - 1 - (~low & rest).bit_length(), p - 1 - (high & rest).bit_length())
            low = (low << k) & rest
            high = half | ((high << k) & rest) | ((1 << k) - 1)
            self.pending += k
        self.low, self.high = low, high

    def finish(self):
        """Send 2 bits (+ pending) that pin a point of [low, high], pad to a byte.

        By (I1)/(I2) either low < QUARTER (send 01: the point 0.01000... is
        inside) or high >= 3 QUARTER (send 10). The decoder reads zeros past
        the end of the data, which completes that point."""
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
    """Mirror of ArithmeticEncoder. Per symbol: c = target(total), the model
    finds the symbol with low_count <= c < high_count, then consume(low_count,
    high_count, total) applies the encoder's exact update.

    Invariant: low <= value <= high, where `value` is the next `precision` bits
    of the code stream seen through the same shifts as low and high. Any input
    bits keep it, so decoding random bits always yields valid symbols."""

    def __init__(self, data, precision=32):
        self.data = bytes(data)
        self.precision = precision
        self.mask = (1 << precision) - 1
        self.half = 1 << (precision - 1)
        self.quarter = 1 << (precision - 2)
        self.pos = 0                 # next byte of data to load
        self.buf, self.nbuf = 0, 0   # loaded, unread bits
        self.low, self.high = 0, self.mask
        self.value = self._read(precision)

    def _read(self, n):
        """The next n bits as an integer; zeros past the end of the data."""
        while self.nbuf < n:
            chunk = self.data[self.pos:self.pos + 8]
            self.pos += 8
            self.buf = (self.buf << 64) | int.from_bytes(chunk + bytes(8 - len(chunk)), "big")
            self.nbuf += 64
        self.nbuf -= n
        bits = self.buf >> self.nbuf
        self.buf &= (1 << self.nbuf) - 1
        return bits

    def target(self, total):
        """The count c in [0, total) whose symbol's slice of [low, high] holds
        value: floor(range * lo / total) <= value - low < floor(range * hi / total)
        is equivalent to lo <= c < hi for c = ((value - low + 1) total - 1) // range."""
        return ((self.value - self.low + 1) * total - 1) // (self.high - self.low + 1)

    def consume(self, low_count, high_count, total):
        low = self.low
        if not 0 <= low_count < high_count <= total <= self.quarter:
            raise ValueError(f"bad interval [{low_count}, {high_count}) of {total}")
        rng = self.high - low + 1
        high = low + rng * high_count // total - 1
        low = low + rng * low_count // total
        p = self.precision
        n = p - (low ^ high).bit_length()
        value = self.value
        if n:  # E1/E2: shift the settled bits out of low, high and value
            low = (low << n) & self.mask
            high = ((high << n) & self.mask) | ((1 << n) - 1)
            value = ((value << n) & self.mask) | self._read(n)
        half = self.half
        if low & self.quarter and not high & self.quarter:  # E3: drop the second bit
            rest = half - 1
            k = min(p - 1 - (~low & rest).bit_length(), p - 1 - (high & rest).bit_length())
            low = (low << k) & rest
            high = half | ((high << k) & rest) | ((1 << k) - 1)
            value = (value & half) | ((value << k) & rest) | self._read(k)
        self.low, self.high, self.value = low, high, value


# ----------------------------------------------------------------------------- probabilities -> frequencies

def quantise(probs, k=16):
    """Float probabilities (..., V) -> int64 frequencies (..., V), sum exactly 2^k, each >= 1.

    f = 1 + floor(p (2^k - V)) reserves one count per symbol (a symbol the
    model deems impossible stays codable) and shares the rest in proportion
    to p; the few counts lost to rounding (fewer than V) go to the most
    probable symbol. Deterministic: the same floats give the same integers."""
    p = np.asarray(probs, dtype=np.float64)
    v = p.shape[-1]
    total = 1 << k
    if total < v:
        raise ValueError(f"2^{k} counts cannot give each of {v} symbols at least 1")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    freq = 1 + np.floor(p * (total - v)).astype(np.int64)
    rest = total - freq.sum(-1, keepdims=True)  # in [0, V): sum(floor) <= sum(p (2^k - V))
    np.put_along_axis(freq, p.argmax(-1)[..., None],
                      np.take_along_axis(freq, p.argmax(-1)[..., None], -1) + rest, -1)
    return freq


def cumulative(freq):
    """(..., V) frequencies -> (..., V + 1) cumulative counts starting at 0."""
    cum = np.zeros(freq.shape[:-1] + (freq.shape[-1] + 1,), np.int64)
    np.cumsum(freq, -1, out=cum[..., 1:])
    return cum


# ----------------------------------------------------------------------------- models of P(x_t | x_<t)
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

    def encode(self, enc, s):
        tree = self.tree
        lo, i = 0, s
        while i:  # prefix sum of freq[0:s]
            lo += tree[i]
            i &= i - 1
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


# Kind of a byte for the escape classes: 0 blank, 1 newline, 2 word (letters, digits, _), 3 other.
BYTE_KIND = [0 if b in b" \t" else 1 if b == 10 else 2 if chr(b).isalnum() or b == 95 else 3
             for b in range(256)]


class ContextModel:
    """PPM with full exclusion, update exclusion, SEE, and a match model.

    The longest context of the last `order` bytes that has been seen predicts
    first. In a context whose candidate bytes have counts c_s (d of them):
        P(x in this context) = q,       P(s | in it) = (2 c_s - 1) / sum_s' (2 c_s' - 1)
    and 1 - q escapes to the next shorter context, with the bytes already ruled
    out excluded (they cannot be the answer). PPM method D would fix
    q = 1 - d / sum(2 c_s); here q is *learned* (secondary escape estimation,
    SEE, as in PPMZ/PPMd): contexts are grouped into classes (order, d, total
    count, exclusions or not) and each class counts how often the byte was
    there. Below order 0 a uniform order -1 over the remaining byte values ends
    the chain. Only the contexts from the order that coded the byte upwards
    are updated (update exclusion; Cleary & Witten 1984, Moffat 1990).

    In front of PPM, a match model (as in LZP and lpaq) finds the last time the
    previous `min_match` bytes occurred and predicts the byte that followed then.
    A binary event "the predicted byte comes next" is coded with adaptive counts
    kept per class of match length and PPM agreement; on a miss, PPM codes the byte with it excluded.
    Source code repeats long stretches, which PPM's short contexts cannot see."""

    def __init__(self, order=10, limit=250, min_match=64):
        self.order, self.limit, self.min_match = order, limit, min_match
        self.tables = [{} for _ in range(order + 1)]  # tables[k][last k bytes] -> {byte: count}
        self.masks = [(1 << (8 * k)) - 1 for k in range(order + 1)]
        self.history = 0                  # the last `order` bytes as one integer
        self.data = bytearray()           # everything seen, for the match model
        self.match_table = {}             # hash of min_match bytes -> position after them
        self.match_ptr = 0                # data[match_ptr] is the predicted byte (0: none)
        self.match_len = 0
        self.match_counts = {}            # match class -> [hits, misses]
        self.see_counts = {}              # context class -> [present, escaped]

    def _candidates(self, node, excluded):
        """[(byte, 2c - 1)] of a context node, minus excluded bytes; insertion order."""
        return [(s, 2 * c - 1) for s, c in node.items() if s not in excluded]

    def _predicted(self):
        """(predicted byte, its [hits, misses] counts) or (None, None) without a match.

        The counts are kept per class (SEE again): log2 of how far the match has
        run past min_match, and what the longest PPM context says of the guess
        (no such context / never seen there / seen once / seen more)."""
        if self.match_len:
            guess = self.data[self.match_ptr]
            node = self.tables[self.order].get(self.history)
            c = node.get(guess, 0) if node else -1
            key = (min((self.match_len - self.min_match).bit_length(), 15), min(c, 2))
            bucket = self.match_counts.get(key)
            if bucket is None:
                bucket = self.match_counts[key] = [1, 1]
            return guess, bucket
        return None, None

    def encode(self, enc, x):
        guess, bucket = self._predicted()
        excluded = set()
        if guess is not None:
            hits, misses = bucket
            if x == guess:
                enc.encode(0, hits, hits + misses)
                self._update(x, 0, bucket)
                return
            enc.encode(hits, hits + misses, hits + misses)
            excluded.add(guess)
        h, found, events = self.history, -1, []
        for k in range(self.order, -1, -1):
            node = self.tables[k].get(h & self.masks[k])
            if node is None:
                continue
            cands = self._candidates(node, excluded)
            if not cands:
                continue
            # First a binary event, "x is one of this context's candidates", with
            # odds learned per class of context (SEE); then which one, by counts.
            # If the candidates are all the bytes not excluded, x is among them.
            present = x in node and x not in excluded
            if len(cands) + len(excluded) < 256:
                odds = self._escape_odds(k, cands, node)
                hits, misses = odds
                events.append((odds, present))
                if not present:  # escape
                    enc.encode(hits, hits + misses, hits + misses)
                    excluded.update(node)
                    continue
                enc.encode(0, hits, hits + misses)
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
            if dec.target(hits + misses) < hits:
                dec.consume(0, hits, hits + misses)
                self._update(guess, 0, bucket)
                return guess
            dec.consume(hits, hits + misses, hits + misses)
            excluded.add(guess)
        h, found, events = self.history, -1, []
        for k in range(self.order, -1, -1):
            node = self.tables[k].get(h & self.masks[k])
            if node is None:
                continue
            cands = self._candidates(node, excluded)
            if not cands:
                continue
            if len(cands) + len(excluded) < 256:
                odds = self._escape_odds(k, cands, node)
                hits, misses = odds
                present = dec.target(hits + misses) < hits
                events.append((odds, present))
                if not present:
                    dec.consume(hits, hits + misses, hits + misses)
                    excluded.update(node)
                    continue
                dec.consume(0, hits, hits + misses)
            x = cands[0][0]
            if len(cands) > 1:
                total = sum(f for _, f in cands)
                target, lo = dec.target(total), 0
                for x, f in cands:
                    if target < lo + f:
                        break
                    lo += f
                dec.consume(lo, lo + f, total)
            found = k
            break
        else:
            target = dec.target(256 - len(excluded))
            x = [s for s in range(256) if s not in excluded][target]
            dec.consume(target, target + 1, 256 - len(excluded))
        self._update(x, found, bucket, events)
        return x

    def _escape_odds(self, k, cands, node):
        """[present, escaped] counts shared by the contexts of one class: order k,
        number of candidates d, their total count, whether exclusions removed any,
        and the kinds of the last two bytes (blank, newline, word, punctuation):
        after a newline or inside a name, novel bytes are more or less likely."""
        d, n = len(cands), sum(f for _, f in cands)
        key = (k, min(d, 7), min(n, 31) if d == 1 else 32 + min(n.bit_length(), 12), len(node) == d,
               BYTE_KIND[self.history & 255], BYTE_KIND[(self.history >> 8) & 255])
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
        h = self.history
        for k in range(max(found, 0), self.order + 1):
            key = h & self.masks[k]
            node = self.tables[k].get(key)
            if node is None:
                self.tables[k][key] = {x: 1}
                continue
            c = node.get(x, 0) + 1
            node[x] = c
            if c > self.limit:  # halve: old statistics fade, counts stay small
                for s in node:
                    node[s] = (node[s] + 1) // 2
        self.history = ((h << 8) | x) & self.masks[self.order]
        # Match model: extend the current match, or look the context up afresh.
        data = self.data
        data.append(x)
        if self.match_len and data[self.match_ptr] == x:
            self.match_len += 1
            self.match_ptr += 1
        else:
            self.match_len = 0
        m = self.min_match
        if len(data) >= m:
            key = bytes(data[-m:])
            if not self.match_len:
                ptr = self.match_table.get(key, 0)
                if ptr:
                    self.match_ptr, self.match_len = ptr, m
            self.match_table[key] = len(data)


MODELS = {"order0": Order0Model, "context": ContextModel}


def encode_with(model, data, precision=32):
    """Code the bytes `data` with a per-byte model; returns (payload, encoder)."""
    enc = ArithmeticEncoder(precision)
    for x in data:
        model.encode(enc, x)
    return enc.finish(), enc


def decode_with(model, payload, n, precision=32):
    dec = ArithmeticDecoder(payload, precision)
    return bytes(model.decode(dec) for _ in range(n))


class MeasuringEncoder(ArithmeticEncoder):
    """An encoder that also adds up the ideal code length sum -log2(f / total)
    of the integer model it is fed (for bench and tests; slower)."""

    def __init__(self, precision=32):
        super().__init__(precision)
        self.ideal_bits = 0.0

    def encode(self, low_count, high_count, total):
        self.ideal_bits -= math.log2((high_count - low_count) / total)
        super().encode(low_count, high_count, total)


# ----------------------------------------------------------------------------- data: the standard library's .py files

def stdlib_dir():
    return Path(sysconfig.get_paths()["stdlib"])


def corpus(root):
    """(train bytes, held-out bytes): every .py file under root (site-packages
    excepted), split by a hash of its relative path: 1 file in 20 is held out."""
    root = Path(root)
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


# ----------------------------------------------------------------------------- the neural model

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


def train_model(model, text, args, device):
    data = torch.from_numpy(np.frombuffer(text, np.uint8).copy())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Warm up for 50 steps, then cosine decay to a tenth of the peak rate.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s / max(args.steps, 1), 1.0)))))
    offsets = torch.arange(args.seq_len + 1)
    progress = Progress(args.steps)
    model.train()
    for step in range(1, args.steps + 1):
        # Random windows of seq_len + 1 bytes: inputs x[:, :-1], targets x[:, 1:].
        start = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size, 1))
        window = data[start + offsets].long().to(device)      # (B, T + 1)
        logits, _ = model(window[:, :-1])                      # (B, T, V)
        loss = bits_per_byte_loss(logits, window[:, 1:])
        check_finite(step, loss=loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.update(step, args.batch_size * args.seq_len, bits_per_byte=loss.item())
    return args.steps


def stream_layout(n, max_streams, min_chunk=4096):
    """Cut n bytes into B consecutive streams of `chunk` bytes (the last one
    shorter): the lengths of the B streams coded in lock-step."""
    if n == 0:
        return []
    chunk = max(min_chunk, -(-n // max_streams))
    return [min(chunk, n - i) for i in range(0, n, chunk)]


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
    bits, h = 0.0, None
    for t in range(0, chunk, 512):
        logits, h = model(inputs[:, t:t + 512], h)
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, t:t + 512], reduction="none")
        bits += (nll * valid[:, t:t + 512]).sum().item() / math.log(2)
    return bits


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


def neural_encode(model, device, data, lengths, k=24, precision=32, measure=None):
    """-> one payload per stream. `measure` (a dict) receives the ideal code
    length under the float model and under the quantised model, in bits."""
    chunk = lengths[0] if lengths else 0
    x = np.full((len(lengths), chunk), START, np.int64)
    x.reshape(-1)[:len(data)] = np.frombuffer(data, np.uint8)
    encs = [ArithmeticEncoder(precision) for _ in lengths]
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


def neural_decode(model, device, payloads, lengths, k=24, precision=32):
    decs = [ArithmeticDecoder(p, precision) for p in payloads]
    chunk = lengths[0] if lengths else 0
    out = np.full((len(lengths), chunk), START, np.int64)
    rows = np.arange(len(lengths))
    total = 1 << k

    def code_step(t, probs, cum):
        live = rows if t < lengths[-1] else rows[:-1]
        targets = np.array([decs[b].target(total) for b in live.tolist()], np.int64)
        # the symbol s with cum[s] <= target < cum[s + 1], for every live stream
        s = (cum[live, 1:] <= targets[:, None]).sum(1)
        lo, hi = cum[live, s].tolist(), cum[live, s + 1].tolist()
        for b, l, h in zip(live.tolist(), lo, hi):
            decs[b].consume(l, h, total)
        out[live, t] = s
        return out[:, t]

    neural_lockstep(model, device, lengths, k, code_step)
    return out.reshape(-1)[:sum(lengths)].astype(np.uint8).tobytes()


def load_neural(ckpt_path, device):
    """(model on device, sha256 of the checkpoint file) or a one-line error."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    model = ByteGRU(cfg["hidden"], cfg["embed"]).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise RunError(f"{ckpt_path}: weights do not fit ByteGRU ({str(e).splitlines()[0]})") from None
    return model, hashlib.sha256(Path(ckpt_path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the container
#
#   "ACPY" | version (1 byte) | header length (4 bytes) | header (JSON) | CRC32 of all before (4)
#   | payload: the coded streams, back to back
# The header holds the model spec, the original length and CRC32, the stream
# lengths and the payload's CRC32. A damaged header or payload is caught before
# decoding starts; a wrong model (or a bug) is caught by the CRC of the output.

MAGIC, VERSION = b"ACPY", 2  # 2: context model with match classes and byte-kind escape classes
DEFAULT_CKPT = f"runs/{SCRIPT}/model.pt"


def pack_archive(spec, data, payloads):
    body = b"".join(payloads)
    header = dict(spec, length=len(data), crc32=zlib.crc32(data), streams=[len(p) for p in payloads],
                  payload_crc32=zlib.crc32(body))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head = MAGIC + bytes([VERSION]) + struct.pack(">I", len(text)) + text
    return head + struct.pack(">I", zlib.crc32(head)) + body


def unpack_archive(blob, name="archive"):
    """-> (header dict, payloads), or a one-line RunError saying what is wrong."""
    if blob[:4] != MAGIC:
        raise RunError(f"{name} is not an {SCRIPT} archive (it does not start with {MAGIC!r})")
    if len(blob) < 9:
        raise RunError(f"{name} is truncated (it ends inside the header)")
    if blob[4] != VERSION:
        raise RunError(f"{name} has format version {blob[4]}; this script reads version {VERSION}")
    end = 9 + struct.unpack(">I", blob[5:9])[0]
    if len(blob) < end + 4:
        raise RunError(f"{name} is truncated (it ends inside the header)")
    if zlib.crc32(blob[:end]) != struct.unpack(">I", blob[end:end + 4])[0]:
        raise RunError(f"{name} is damaged: its header fails the CRC check")
    try:
        header = json.loads(blob[9:end])
        streams = [int(n) for n in header["streams"]]
        int(header["length"]), int(header["crc32"]), int(header["payload_crc32"]), header["model"]
    except (ValueError, KeyError, TypeError):
        raise RunError(f"{name} has a header this version cannot read") from None
    body = blob[end + 4:]
    if len(body) != sum(streams):
        raise RunError(f"{name} is truncated or has bytes appended: payload is {len(body)} bytes, "
                       f"the header says {sum(streams)}")
    if zlib.crc32(body) != header["payload_crc32"]:
        raise RunError(f"{name} is damaged: its payload fails the CRC check")
    offsets = np.cumsum([0] + streams).tolist()
    return header, [body[a:b] for a, b in zip(offsets, offsets[1:])]


def compress(data, model_name, args, measure=None):
    """bytes -> archive bytes with the chosen model."""
    spec = {"model": model_name, "precision": args.precision}
    if model_name == "neural":
        device = pick_device(args.device)
        model, digest = load_neural(args.ckpt or DEFAULT_CKPT, device)
        lengths = stream_layout(len(data), args.streams)
        spec.update(ckpt_sha256=digest, device=device.type, threads=torch.get_num_threads(),
                    k=args.k, chunk=lengths[0] if lengths else 0)
        payloads = neural_encode(model, device, data, lengths, args.k, args.precision, measure)
    else:
        model = Order0Model() if model_name == "order0" else ContextModel(args.order, min_match=args.min_match)
        if model_name == "context":
            spec.update(order=args.order, min_match=args.min_match)
        enc = MeasuringEncoder(args.precision) if measure is not None else ArithmeticEncoder(args.precision)
        for x in data:
            model.encode(enc, x)
        payloads = [enc.finish()]
        if measure is not None:
            measure.update(quantised_bits=enc.ideal_bits, bits_before_padding=enc.bits_before_padding)
    return pack_archive(spec, data, payloads)


def decompress(blob, args, name="archive"):
    header, payloads = unpack_archive(blob, name)
    n, kind, precision = header["length"], header["model"], header.get("precision", 32)
    if kind == "neural":
        ckpt = args.ckpt or DEFAULT_CKPT
        if not Path(ckpt).is_file():
            raise RunError(f"{name} was made with the neural model (sha256 {header['ckpt_sha256'][:12]}...); "
                           f"its model.pt was not found at {ckpt} (pass --ckpt PATH)")
        device = pick_device(args.device)
        model, digest = load_neural(ckpt, device)
        if digest != header["ckpt_sha256"]:
            raise RunError(f"{ckpt} is not the model {name} was made with "
                           f"(sha256 {digest[:12]}... != {header['ckpt_sha256'][:12]}...)")
        if device.type != header["device"]:
            raise RunError(f"{name} was made on {header['device']}; decode it there too "
                           f"(--device {header['device']}): float results differ between devices")
        torch.set_num_threads(header["threads"])
        lengths = stream_layout(n, 1 << 30, header["chunk"]) if n else []
        if len(lengths) != len(payloads):
            raise RunError(f"{name} is damaged: {len(payloads)} streams for {len(lengths)} chunks")
        data = neural_decode(model, device, payloads, lengths, header["k"], precision)
    elif kind in MODELS:
        model = Order0Model() if kind == "order0" else ContextModel(header["order"], min_match=header["min_match"])
        if len(payloads) != 1:
            raise RunError(f"{name} is damaged: {len(payloads)} streams, expected 1")
        data = decode_with(model, payloads[0], n, precision)
    else:
        raise RunError(f"{name} uses model {kind!r}, which this script does not know")
    if zlib.crc32(data) != header["crc32"]:
        raise RunError(f"{name} decoded to data that fails the CRC check (wrong model or damaged file)")
    return data


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


# ----------------------------------------------------------------------------- sampling: the decoder fed random bits

def sample_bytes(model_name, n, args, prime=b""):
    """Decode n bytes from uniform random bits: an exact sample from the
    (quantised) model, since each symbol's slice of [0, 1) has its probability."""
    noise = np.random.default_rng(args.seed).bytes(64 * n + 64)
    if model_name == "neural":
        device = pick_device(args.device)
        model, _ = load_neural(args.ckpt or DEFAULT_CKPT, device)
        return neural_decode(model, device, [noise], [n] if n else [], args.k, args.precision)
    model = Order0Model() if model_name == "order0" else ContextModel(args.order, min_match=args.min_match)
    encode_with(model, prime, args.precision)  # condition the adaptive model on the prime text
    return decode_with(model, noise, n, args.precision)


# ----------------------------------------------------------------------------- bench

def reference_style_order0(data, limit=1 << 16, precision=32):
    """REFERENCE-STYLE NAIVE CODER, for the speed comparison only: a minimal
    re-implementation of the textbook pure-Python approach (the widely used
    reference coder works this way): rebuild the cumulative table from the
    counts for every symbol, and renormalise one bit per loop iteration with
    one call per output bit. Same model and same arithmetic as Order0Model +
    ArithmeticEncoder, so it must produce the very same bytes.
    Returns (payload, encode seconds, decode seconds)."""
    mask, half, quarter = (1 << precision) - 1, 1 << (precision - 1), 1 << (precision - 2)

    def counts_update(freq, x):
        freq[x] += 1
        if sum(freq) >= limit:
            freq[:] = [(f + 1) // 2 for f in freq]

    t0 = time.perf_counter()
    bits, freq, low, high, pending = [], [1] * 256, 0, mask, 0

    def put(bit):
        bits.append(bit)

    for x in data:
        cum = [0]
        for f in freq:
            cum.append(cum[-1] + f)
        rng = high - low + 1
        high = low + rng * cum[x + 1] // cum[-1] - 1
        low = low + rng * cum[x] // cum[-1]
        while True:
            if high < half:
                put(0)
                for _ in range(pending):
                    put(1)
                pending = 0
            elif low >= half:
                put(1)
                for _ in range(pending):
                    put(0)
                pending = 0
                low, high = low - half, high - half
            elif low >= quarter and high < 3 * quarter:
                pending += 1
                low, high = low - quarter, high - quarter
            else:
                break
            low, high = low * 2, high * 2 + 1
        counts_update(freq, x)
    pending += 1
    first = 0 if low < quarter else 1
    bits += [first] + [1 - first] * pending
    bits += [0] * (-len(bits) % 8)
    payload = bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))
    t1 = time.perf_counter()

    pos = 0

    def get():
        nonlocal pos
        pos += 1
        return bits[pos - 1] if pos <= len(bits) else 0

    freq, low, high, value = [1] * 256, 0, mask, 0
    bits = [(byte >> (7 - i)) & 1 for byte in payload for i in range(8)]
    for _ in range(precision):
        value = value * 2 + get()
    out = bytearray()
    for _ in range(len(data)):
        cum = [0]
        for f in freq:
            cum.append(cum[-1] + f)
        rng = high - low + 1
        target = ((value - low + 1) * cum[-1] - 1) // rng
        a, b = 0, 256  # binary search: cum[a] <= target < cum[b]
        while b - a > 1:
            mid = (a + b) // 2
            if cum[mid] > target:
                b = mid
            else:
                a = mid
        x = a
        high = low + rng * cum[x + 1] // cum[-1] - 1
        low = low + rng * cum[x] // cum[-1]
        while True:
            if high < half:
                pass
            elif low >= half:
                low, high, value = low - half, high - half, value - half
            elif low >= quarter and high < 3 * quarter:
                low, high, value = low - quarter, high - quarter, value - quarter
            else:
                break
            low, high, value = low * 2, high * 2 + 1, value * 2 + get()
        out.append(x)
        counts_update(freq, x)
    t2 = time.perf_counter()
    if bytes(out) != data:
        raise RunError("reference-style coder failed its own round trip")
    return payload, t1 - t0, t2 - t1


def bench_model(name, data, args):
    """One row: ideal bits, actual bytes, overhead, encode / decode MB/s, checked round trip."""
    measure = {}
    t0 = time.perf_counter()
    blob = compress(data, name, args, measure)
    t1 = time.perf_counter()
    back = decompress(blob, args)
    t2 = time.perf_counter()
    if back != data:
        raise RunError(f"{name}: round trip failed")
    header, payloads = unpack_archive(blob)
    payload = sum(len(p) for p in payloads)
    mb = len(data) / 1e6
    row = {"model": name, "ideal_bits": round(measure["quantised_bits"], 1),
           "ideal_bytes": round(measure["quantised_bits"] / 8), "payload_bytes": payload,
           "archive_bytes": len(blob),
           "overhead_bits": round(8 * payload - measure["quantised_bits"], 1),
           "bits_per_byte": round(8 * payload / max(len(data), 1), 4),
           "encode_MB_per_s": round(mb / (t1 - t0), 4), "decode_MB_per_s": round(mb / (t2 - t1), 4)}
    if "float_bits" in measure:
        row["float_ideal_bits"] = round(measure["float_bits"], 1)
        row["quantisation_loss_percent"] = round(
            100 * (measure["quantised_bits"] / measure["float_bits"] - 1), 4)
        row["streams"] = len(payloads)
    return row


def run_bench(args):
    if args.files:
        files = [(f, read_input(f)) for f in args.files]
    else:
        _, heldout = corpus(args.data_dir)
        files = [(f"stdlib held-out .py, first {args.limit} bytes", heldout[:args.limit])]
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
        # Side by side on the same slice: our order-0 coder and the reference-style one.
        part = data[:args.ref_limit]
        if part and "order0" in models:
            payload, t_enc, t_dec = reference_style_order0(part)
            ours_t0 = time.perf_counter()
            ours, _ = encode_with(Order0Model(), part)
            ours_t1 = time.perf_counter()
            decode_with(Order0Model(), ours, len(part))
            ours_t2 = time.perf_counter()
            mb = len(part) / 1e6
            entry["order0_side_by_side"] = {
                "bytes": len(part), "same_output": payload == ours,
                "reference_style_encode_MB_per_s": round(mb / t_enc, 4),
                "reference_style_decode_MB_per_s": round(mb / t_dec, 4),
                "ours_encode_MB_per_s": round(mb / (ours_t1 - ours_t0), 4),
                "ours_decode_MB_per_s": round(mb / (ours_t2 - ours_t1), 4)}
        results.append(entry)
    lines = ["| file | bytes | model | ideal bytes | actual bytes | overhead bits | bits/byte "
             "| enc MB/s | dec MB/s |", "|" + " --- |" * 9]
    for e in results:
        for r in e["models"]:
            lines.append(f"| {e['file']} | {e['bytes']} | {r['model']} | {r['ideal_bytes']} | "
                         f"{r['payload_bytes']} | {r['overhead_bits']} | {r['bits_per_byte']} | "
                         f"{r['encode_MB_per_s']} | {r['decode_MB_per_s']} |")
        for tool in ("zlib_9", "bz2_9", "xz_9e"):
            size = e[f"{tool}_bytes"]
            lines.append(f"| {e['file']} | {e['bytes']} | {tool} | | {size} | | "
                         f"{8 * size / max(e['bytes'], 1):.4f} | | |")
        s = e.get("order0_side_by_side")
        if s:
            lines.append(f"| first {s['bytes']} bytes | {s['bytes']} | order0, reference-style naive "
                         f"coder (re-implementation) | | | | | {s['reference_style_encode_MB_per_s']} "
                         f"| {s['reference_style_decode_MB_per_s']} |")
            lines.append(f"| first {s['bytes']} bytes | {s['bytes']} | order0, this coder "
                         f"(same bytes: {s['same_output']}) | | | | | {s['ours_encode_MB_per_s']} "
                         f"| {s['ours_decode_MB_per_s']} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    atomic_write(out / "bench.md", lambda f: f.write((table + "\n").encode()))
    write_metrics(out / "bench.json", results)
    print(json.dumps(results))
    return results


# ----------------------------------------------------------------------------- train (the default run)

def run_train(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text, heldout = corpus(args.data_dir)
    test_text = heldout[:args.test_limit or None]
    if args.sample_only:
        model, _ = load_neural(args.ckpt, device)
        steps, train_seconds = 0, 0.0
    else:
        model = ByteGRU(args.hidden, args.embed).to(device)
        start = time.time()
        steps = train_model(model, train_text, args, device)
        train_seconds = time.time() - start
        save_checkpoint(out / "model.pt", model.state_dict(), vars(args))
        args.ckpt = str(out / "model.pt")
    bits = evaluate_bits(model, test_text, device, args.streams)
    # A real round trip through the container on a slice of held-out text.
    part = test_text[:args.check_bytes]
    if decompress(compress(part, "neural", args), args) != part:
        raise RunError("neural round trip failed")
    text = sample_bytes("neural", args.num_samples, args)
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


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train"] + argv  # the default run trains the neural model
    fmt = argparse.ArgumentDefaultsHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--ckpt", help=f"neural model.pt (default {DEFAULT_CKPT})")
    common.add_argument("--precision", type=int, default=32, help="bits of the coder's state")
    common.add_argument("--k", type=int, default=24, help="neural frequencies sum to 2^k")
    common.add_argument("--order", type=int, default=10, help="context model: longest PPM context")
    common.add_argument("--min-match", type=int, default=64,
                        help="context model: bytes of context the match model looks up")
    common.add_argument("--streams", type=int, default=256,
                        help="neural: most streams coded in lock-step (each >= 4096 bytes)")
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
    c.add_argument("--model", choices=["order0", "context", "neural"], default="context")
    c.add_argument("--force", action="store_true", help="overwrite OUT")
    d = sub.add_parser("decompress", parents=[common], formatter_class=fmt)
    d.add_argument("input", metavar="IN")
    d.add_argument("output", metavar="OUT")
    d.add_argument("--force", action="store_true", help="overwrite OUT")
    s = sub.add_parser("sample", parents=[common], formatter_class=fmt,
                       help="decode random bits: an exact sample of the model")
    s.add_argument("--model", choices=["order0", "context", "neural"], default="neural")
    s.add_argument("--num-samples", type=int, default=400, help="bytes to sample")
    s.add_argument("--prime", help="order0/context: text the adaptive model reads first")
    b = sub.add_parser("bench", parents=[common], formatter_class=fmt)
    b.add_argument("files", nargs="*", help="files to bench (default: held-out stdlib text)")
    b.add_argument("--data-dir", default=str(stdlib_dir()))
    b.add_argument("--limit", type=int, default=1_000_000, help="bytes of held-out text")
    b.add_argument("--models", default="order0,context,neural")
    b.add_argument("--ref-limit", type=int, default=100_000,
                   help="bytes for the side-by-side with the reference-style coder")
    b.add_argument("--out", default=f"runs/{SCRIPT}", help="where bench.md and bench.json go")
    args = p.parse_args(argv)
    if args.command == "train":
        if args.sample_only and not args.ckpt:
            p.error("--sample-only needs --ckpt PATH")
        for flag in ("steps", "batch_size", "seq_len", "hidden", "embed", "num_samples"):
            if getattr(args, flag) < 1:
                p.error(f"--{flag.replace('_', '-')} must be at least 1")
        if args.test_limit < 0:
            p.error("--test-limit must be >= 0")
    if args.command == "bench" and any(m not in ("order0", "context", "neural")
                                       for m in args.models.split(",") if m):
        p.error("--models is a comma-separated list of order0, context, neural")
    if not 20 <= args.precision <= 62:
        p.error("--precision must be in [20, 62] (the context model's totals reach 2^17)")
    if not 8 <= args.k <= args.precision - 2:
        p.error("--k must be in [8, precision - 2]")
    if args.order < 0 or args.min_match < 1 or args.streams < 1:
        p.error("--order must be >= 0, --min-match >= 1 and --streams >= 1")
    return args


def run(args):
    if args.command == "train":
        return run_train(args)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "sample":
        prime = read_input(args.prime) if args.prime else b""
        text = sample_bytes(args.model, args.num_samples, args, prime)
        print(text.decode("utf-8", "replace"))
        return text
    data = read_input(args.input)
    if args.command == "compress":
        start = time.perf_counter()
        result = compress(data, args.model, args)
    else:
        start = time.perf_counter()
        result = decompress(data, args, name=args.input)
    write_output(args.output, result, args.force)
    seconds = time.perf_counter() - start
    info = {"command": args.command, "in_bytes": len(data), "out_bytes": len(result),
            "seconds": round(seconds, 3)}
    print(json.dumps(info))
    return info


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
