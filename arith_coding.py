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

Top to bottom: the textbook coder (one bit per loop: the specification), the fast integer
coder (all settled bits at once: the same bytes), the quantiser (float probabilities ->
integer frequencies, each >= 1), three models of P(x_t | x_<t): adaptive order 0, a PPM
context model (the default of `compress`), a byte-level GRU coded in lock-step streams at
one thread (its archives record torch, device, CPU kernels and a hash of the tables on a
fixed probe: a machine that would compute other tables refuses); the container, the CLI.

Shape legend: B parallel streams (or batch), T time steps, V = 256 byte values, H hidden units.

Run:   python arith_coding.py                      (= train: about 9 minutes on a 2-core CPU)
       python arith_coding.py compress IN OUT [--model context|order0|neural]
       python arith_coding.py decompress OUT IN.copy [--max-size BYTES]
       python arith_coding.py sample --num-samples 400
       python tools/compression_bench.py           (archives against zlib, bzip2, xz)
train writes runs/arith_coding/: model.pt, samples.txt and metrics.json (held-out: 1.73 bits/byte).
"""
import argparse
import hashlib
import itertools
import json
import math
import os
import platform
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
# middle. At the end, two more bits pin a point inside the interval. The decoder
# (ArithmeticDecoder, below) repeats these steps on a window of the code stream.

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


# ----------------------------------------------------------------------------- adaptive models of bytes
#
# A model codes byte x with code(encoder, x) and decodes one with code(decoder),
# updating itself afterwards from the byte alone: the decoder's copy of the model
# sees exactly what the encoder's copy saw. One path does both directions.

def code_symbol(coder, s, cum):
    """Encode symbol s, whose counts are [cum[s], cum[s + 1]) of cum[-1], or decode one
    when s is None (the decoder finds s from its stream). A binary event with counts
    (n0, n1) is the symbol 0 or 1 under cum = (0, n0, n0 + n1)."""
    if s is None:
        return coder.decode_symbol(cum)
    coder.encode(int(cum[s]), int(cum[s + 1]), int(cum[-1]))
    return s


class Order0Model:
    """Adaptive order 0: P(x_t = s | x_<t) = n_s / sum(n), with n_s = 1 + count
    of s so far; when sum(n) reaches `limit` all counts are halved (rounding up),
    which keeps the model adaptive and the total within the coder's range."""

    def __init__(self, limit=1 << 16):
        self.limit, self.cum = limit, np.arange(257, dtype=np.int64)  # cum[s] = n_0 + ... + n_(s-1)

    def code(self, coder, x=None):
        x = code_symbol(coder, x, self.cum)
        self.cum[x + 1:] += 1  # n_x += 1
        if self.cum[-1] >= self.limit:
            self.cum = cumulative((np.diff(self.cum) + 1) // 2)
        return x


def encode_with(model, data, state_bits=32, enc=None):
    """Code the bytes `data` with a byte model; returns (payload, encoder)."""
    enc = enc or ArithmeticEncoder(state_bits)
    for x in data:
        model.code(enc, x)
    return enc.finish(), enc


def decode_with(model, payload, n, state_bits=32):
    dec = ArithmeticDecoder(payload, state_bits)
    return bytes(model.code(dec) for _ in range(n))


# ----------------------------------------------------------------------------- a PPM context model
# (the default of `compress`: stronger on text, full of engineering, the same method)

# Kind of a byte for the escape classes: 0 blank, 1 newline, 2 word (letters, digits, _), 3 other.
BYTE_KIND = [0 if b in b" \t" else 1 if b == 10 else 2 if chr(b).isalnum() or b == 95 else 3
             for b in range(256)]
# The model's own count of its memory, in bytes (CPython 3.11, fitted to the growth of RSS):
NODE_BYTES = 176    # one context: its integer key, its dict slot, a small bytearray
PAIR_BYTES = 2      # one (byte, count) pair inside a context's bytearray
MATCH_BYTES = 128   # one match-table entry: a 64-bit hash key, a position, its dict slot


class ContextModel:
    """PPM with full exclusion, update exclusion, SEE, a match model and a memory budget.

    The longest context of the last `order` bytes that has been seen predicts first.
    In a context whose candidate bytes have counts c_s (d of them):
        P(x in this context) = q,       P(s | in it) = (2 c_s - 1) / sum_s' (2 c_s' - 1)
    and 1 - q escapes to the next shorter context, with the bytes already ruled out
    excluded. PPM method D would fix q = 1 - d / sum(2 c_s); here q is learned per class
    of contexts (secondary escape estimation, SEE, as in PPMZ/PPMd). Below order 0 a
    uniform order -1 ends the chain. Only the contexts from the order that coded the
    byte upwards are updated (update exclusion; Cleary & Witten 1984, Moffat 1990).
    In front of PPM, a match model (as in LZP and lpaq) predicts the byte that followed
    the last occurrence of the previous `min_match` bytes; on a miss PPM codes the byte
    with it excluded. A context is a bytearray of (byte, count) pairs (counts <= limit
    < 255); past `memory_mb` MB of tables the model starts afresh, as PPMd does."""

    def __init__(self, order=10, limit=250, min_match=64, memory_mb=700):
        self.order, self.limit, self.min_match = order, limit, min_match
        self.budget = memory_mb << 20
        self.masks = [(1 << (8 * k)) - 1 for k in range(order + 1)]
        self.history = self.resets = 0    # the last `order` bytes as one integer; budget resets
        self.match_counts = {}            # match class -> [hits, misses]
        self.see_counts = {}              # context class -> [present, escaped]
        self._forget()

    def _forget(self):
        """Empty tables (at the start, and when the memory budget is spent)."""
        self.tables = [{} for _ in range(self.order + 1)]  # tables[k][last k bytes] -> pairs
        self.data = bytearray()           # everything seen since, for the match model
        self.match_table = {}             # hash of min_match bytes -> position after them
        self.match_ptr = self.match_len = self.used = 0

    @staticmethod
    def _find(node, x):
        """Index of byte x among the pairs of node (even positions), or -1."""
        i = node.find(x)
        while i > 0 and i & 1:
            i = node.find(x, i + 1)
        return i

    def _candidates(self, node, excluded):
        """[(byte, 2c - 1)] of a context node, minus excluded bytes; insertion order."""
        return [(s, 2 * c - 1) for s, c in zip(node[0::2], node[1::2]) if s not in excluded]

    def _predicted(self):
        """(predicted byte, its [hits, misses] counts) or (None, None) without a match. Counts
        are kept per class: log2 of how far the match has run past min_match, and what the
        longest PPM context says of the guess (no such context / unseen / once / more)."""
        if not self.match_len:
            return None, None
        guess = self.data[self.match_ptr]
        node, c = self.tables[self.order].get(self.history), -1
        if node is not None:
            i = self._find(node, guess)
            c = node[i + 1] if i >= 0 else 0
        key = (min((self.match_len - self.min_match).bit_length(), 15), min(c, 2))
        return guess, self.match_counts.setdefault(key, [1, 1])

    def code(self, coder, x=None):
        """Encode byte x with an ArithmeticEncoder, or decode one (x None) with an
        ArithmeticDecoder; returns the byte."""
        guess, bucket = self._predicted()
        excluded, events, found = set(), [], -1
        if guess is not None:  # the match model first: "the guess comes next", or not
            if not code_symbol(coder, None if x is None else x != guess, (0, bucket[0], sum(bucket))):
                self._update(guess, 0, bucket)
                return guess
            excluded.add(guess)
        for k in range(self.order, -1, -1):
            node = self.tables[k].get(self.history & self.masks[k])
            cands = self._candidates(node, excluded) if node is not None else None
            if not cands:
                continue
            # First a binary event, "x is one of this context's candidates", with
            # odds learned per class (SEE); then which one, by counts. If the
            # candidates are all the bytes not excluded, x is among them.
            if len(cands) + len(excluded) < 256:
                odds = self._escape_odds(k, cands, node)
                escape = None if x is None else x in excluded or self._find(node, x) < 0
                escape = code_symbol(coder, escape, (0, odds[0], odds[0] + odds[1]))
                events.append((odds, not escape))
                if escape:
                    excluded.update(node[0::2])
                    continue
            syms, cum = [s for s, _ in cands], [0, *itertools.accumulate(f for _, f in cands)]
            i = 0 if len(syms) == 1 else code_symbol(coder, None if x is None else syms.index(x), cum)
            x, found = syms[i], k
            break
        else:  # order -1: uniform over the byte values not excluded
            rest = [s for s in range(256) if s not in excluded]
            x = rest[code_symbol(coder, None if x is None else rest.index(x), range(len(rest) + 1))]
        self._update(x, found, bucket, events)
        return x

    def _escape_odds(self, k, cands, node):
        """[present, escaped] counts shared by the contexts of one class: order k,
        number of candidates d, their total count, whether exclusions removed any,
        and the kinds of the last two bytes (blank, newline, word, punctuation)."""
        d, n = len(cands), sum(f for _, f in cands)
        key = (k, min(d, 7), min(n, 31) if d == 1 else 32 + min(n.bit_length(), 12),
               len(node) // 2 == d, BYTE_KIND[self.history & 255], BYTE_KIND[(self.history >> 8) & 255])
        return self.see_counts.setdefault(key, [1, 1])

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
        if self.used > self.budget:
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
            elif (i := self._find(node, x)) < 0:
                node += bytes((x, 1))
                self.used += PAIR_BYTES
            else:
                node[i + 1] += 1
                if node[i + 1] > self.limit:  # halve: old statistics fade, counts stay small
                    node[1::2] = bytes((c + 1) // 2 for c in node[1::2])
        self.history = ((h << 8) | x) & self.masks[self.order]

    def _update_match(self, x):
        """Extend the current match, or look the context up afresh."""
        data = self.data
        data.append(x)
        self.used += 1
        if self.match_len and data[self.match_ptr] == x:
            self.match_len, self.match_ptr = self.match_len + 1, self.match_ptr + 1
        else:
            self.match_len = 0
        m, w = self.min_match, data[-self.min_match:]
        if len(data) >= m:
            key = zlib.crc32(w) | zlib.adler32(w) << 32  # 64 bits, and the same in every run
            if not self.match_len and self.match_table.get(key, 0):
                self.match_ptr, self.match_len = self.match_table[key], m
            if key not in self.match_table:
                self.used += MATCH_BYTES
            self.match_table[key] = len(data)


# ----------------------------------------------------------------------------- the neural model, coded in lock-step

START = 10        # '\n' stands in for the byte before each stream's first byte
MIN_CHUNK = 4096  # bytes per stream at least: each stream starts cold, from START


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


def stream_lengths(n, max_streams, chunk=None):
    """The lengths of the B streams coded in lock-step: n bytes cut into consecutive
    chunks (the last one shorter), at most max_streams of at least MIN_CHUNK bytes."""
    chunk = chunk or max(MIN_CHUNK, -(-n // max_streams))
    return [min(chunk, n - i) for i in range(0, n, chunk)]


@torch.no_grad()
def neural_lockstep(model, device, lengths, k, code_step, label="probe"):
    """Drive B = len(lengths) coders in lock-step, one byte of every stream per model
    call. The encoder and the decoder both run exactly this loop: the same calls on
    tensors of the same shape, at one thread, so the same floats and integer tables.
    code_step(t, probs, cum) codes byte t of each stream, returns the B bytes to feed
    back (START where a stream ended)."""
    model.eval()
    steps, threads = max(lengths, default=0), torch.get_num_threads()
    progress = Progress(steps, label)
    torch.set_num_threads(1)  # threads split a matmul's sums: another count, other floats
    try:
        prev, h = torch.full((len(lengths), 1), START, dtype=torch.long, device=device), None  # (B, 1)
        for t in range(steps):
            logits, h = model(prev, h)                                     # (B, 1, V)
            probs = torch.softmax(logits[:, 0].float(), -1).cpu().numpy()  # (B, V)
            x = code_step(t, probs, cumulative(quantise(probs, k)))       # cum (B, V + 1)
            prev = torch.as_tensor(x, dtype=torch.long, device=device).view(-1, 1)
            progress(t + 1, len(lengths))
    finally:
        torch.set_num_threads(threads)  # the caller's setting, whatever happened


def neural_code(model, device, coders, lengths, k=24, data=None, label="code"):
    """Encode `data` with one ArithmeticEncoder per stream, or decode (data None) with
    one ArithmeticDecoder per stream; -> the bytes coded."""
    columns = []  # byte t of every stream; grows as it decodes (nothing sized by a header)
    def code_step(t, probs, cum):
        x = np.full(len(lengths), START, np.int64)
        for b in range(len(lengths) if t < lengths[-1] else len(lengths) - 1):  # the last may end first
            x[b] = code_symbol(coders[b], None if data is None else data[b * lengths[0] + t], cum[b])
        columns.append(x.astype(np.uint8))
        return x
    neural_lockstep(model, device, lengths, k, code_step, label)
    return np.stack(columns, 1).reshape(-1)[:sum(lengths)].tobytes() if columns else b""


def load_gru(path, device):
    """(model on device, sha256 of the checkpoint file) or a one-line error."""
    model, _ = load_checkpoint(path, lambda config: ByteGRU(config["hidden"], config["embed"]))
    return model.to(device), hashlib.sha256(Path(path).read_bytes()).hexdigest()


PROBE = b"import os\n\ndef main(argv=None):\n    return 0\n"  # the fingerprint's fixed input


def fingerprint(model, device, n_streams, k):
    """What decides the quantised tables besides the model: torch, the device and its
    kernels (GPU, or CPU architecture and instruction set), and for what these miss, a
    hash of the tables on a fixed probe at the archive's stream count (kernels are
    chosen by shape). Not the thread count: the coder always runs at one."""
    digest = hashlib.sha256()
    def code_step(t, probs, cum):
        digest.update(cum.tobytes())
        return np.frombuffer(PROBE, np.uint8)[(t + np.arange(n_streams)) % len(PROBE)]
    neural_lockstep(model, device, [len(PROBE)] * n_streams, k, code_step)
    kernel = (torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}")
    return {"torch": torch.__version__, "device": device.type, "kernel": kernel,
            "probe_sha256": digest.hexdigest()[:32]}


# ----------------------------------------------------------------------------- the container
#
#   "ACPY" | version (1 byte) | header length (4 bytes) | header (JSON) | payload: the
#   coded streams back to back, or in stored mode the input itself.
# An archive is a file from a stranger: every header field is checked for type and range
# before use, the decoder stops where the payload ends whatever length the header claims,
# and the CRC32 of the decoded data catches the damage that checks cannot.

MAGIC, VERSION = b"ACPY", 4  # 4: the GRU's tables at one thread, the memory budget fitted to RSS
MAX_STREAMS, MAX_ORDER, MAX_MIN_MATCH = 4096, 32, 4096
STORED_OVERHEAD = 50  # bytes of container around a stored input, at most
DEFAULT_CKPT = f"runs/{SCRIPT}/model.pt"
FIELDS = {  # name: (type, smallest, largest) of the value, or of its length
    "length": (int, 0, 1 << 48), "crc32": (int, 0, (1 << 32) - 1),
    "order": (int, 0, MAX_ORDER), "min_match": (int, 1, MAX_MIN_MATCH), "memory_mb": (int, 1, 1 << 20),
    "k": (int, 8, 30), "chunk": (int, 1, 1 << 48),
    "ckpt_sha256": (str, 64, 64), "streams": (list, 0, MAX_STREAMS), "fingerprint": (dict, 4, 4)}
CODED = ("length", "crc32", "streams")
NEEDS = {"stored": ("crc32",), "order0": CODED, "context": CODED + ("order", "min_match", "memory_mb"),
         "neural": CODED + ("k", "chunk", "ckpt_sha256", "fingerprint")}


def pack_archive(header, body):
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + struct.pack(">I", len(text)) + text + body


def compress(data, model_name, order=10, min_match=64, memory_mb=700, ckpt=DEFAULT_CKPT, device="auto",
             k=24, streams=256):
    """bytes -> archive bytes with the chosen model and the 32-bit coder, or stored mode."""
    header = {"model": model_name, "length": len(data), "crc32": zlib.crc32(data)}
    if model_name == "neural":
        device = pick_device(device)
        model, digest = load_gru(ckpt, device)
        lengths = stream_lengths(len(data), streams)
        header.update(ckpt_sha256=digest, k=k, chunk=lengths[0] if lengths else 1,
                      fingerprint=fingerprint(model, device, len(lengths), k))
        encs = [ArithmeticEncoder() for _ in lengths]
        neural_code(model, device, encs, lengths, k, data, "encode")
        payloads = [e.finish() for e in encs]
    elif model_name == "context":
        header.update(order=order, min_match=min_match, memory_mb=memory_mb)
        payloads = [encode_with(ContextModel(order, min_match=min_match, memory_mb=memory_mb), data)[0]]
    else:
        payloads = [encode_with(Order0Model(), data)[0]]
    coded = pack_archive(dict(header, streams=[len(p) for p in payloads]), b"".join(payloads))
    # Stored mode: the input as it is, behind 9 bytes of container and at most 37 of header.
    return min(coded, pack_archive({"model": "stored", "crc32": zlib.crc32(data)}, data), key=len)


def decompress(blob, ckpt=DEFAULT_CKPT, device="auto", max_size=None, memory_mb=700, name="archive"):
    """archive bytes -> the original bytes, or a one-line RunError (nothing decoded unchecked).
    max_size and memory_mb: the most bytes out and context-model MB this run allows."""
    header, payloads = unpack_archive(blob, name)
    if max_size is not None and header["length"] > max_size:
        raise RunError(f"{name} would decode to {header['length']} bytes, more than --max-size {max_size}")
    if header["model"] == "context" and header["memory_mb"] > memory_mb:
        raise RunError(f"{name} needs --memory-mb {header['memory_mb']} (its context model's "
                       f"budget), more than this run allows ({memory_mb})")
    try:  # a length its payload cannot hold ends in EOFError: the decoder never reads far past it
        if header["model"] == "stored":
            data = payloads[0]
        elif header["model"] == "neural":  # refused first where another model or machine made it
            device = pick_device(device)
            model, digest = load_gru(ckpt, device)
            if digest != header["ckpt_sha256"]:
                raise RunError(f"{ckpt} is not the model {name} was made with "
                               f"(sha256 {digest[:12]}... != {header['ckpt_sha256'][:12]}...)")
            lengths = stream_lengths(header["length"], MAX_STREAMS, header["chunk"])
            made, here = header["fingerprint"], fingerprint(model, device, len(lengths), header["k"])
            differ = [key for key in ("torch", "device", "kernel") if made.get(key) != here[key]]
            differ = differ or [key for key in ["probe_sha256"] if made.get(key) != here[key]]
            if differ:  # name what differs: torch, device or kernels, else the tables on the probe
                raise RunError(f"{name} cannot be decoded here, its model's tables would differ: " + "; ".join(
                    f"{key} {str(made.get(key))[:40]} there, {here[key]} here" for key in differ))
            decs = [ArithmeticDecoder(p) for p in payloads]
            data = neural_code(model, device, decs, lengths, header["k"], None, "decode")
        else:
            model = Order0Model() if header["model"] == "order0" else ContextModel(
                header["order"], min_match=header["min_match"], memory_mb=header["memory_mb"])
            data = decode_with(model, payloads[0], header["length"])
    except EOFError:
        raise RunError(f"{name} is damaged: its payload ends before the {header['length']} bytes "
                       "its header claims") from None
    if zlib.crc32(data) != header["crc32"]:
        raise RunError(f"{name} decoded to data that fails the CRC check (wrong model or damaged file)")
    return data


def unpack_archive(blob, name="archive"):
    """-> (header dict, payloads), or a one-line RunError saying what is wrong."""
    if blob[:4] != MAGIC:
        raise RunError(f"{name} is not an {SCRIPT} archive (it does not start with {MAGIC!r})")
    end = 9 + int.from_bytes(blob[5:9], "big")
    if len(blob) < max(end, 9):
        raise RunError(f"{name} is truncated (it ends inside the header)")
    if blob[4] != VERSION:
        raise RunError(f"{name} has format version {blob[4]}; this script reads version {VERSION}")
    try:
        header = json.loads(blob[9:end])
    except (ValueError, RecursionError):
        raise RunError(f"{name} has a header that is not valid JSON (it is damaged)") from None
    body = blob[end:]
    check_header(header, name)
    if header["model"] == "stored":  # the body is the input
        header.update(length=len(body), streams=[len(body)])
    if len(body) != sum(header["streams"]):
        raise RunError(f"{name} is truncated or has bytes appended: payload is {len(body)} bytes, "
                       f"the header says {sum(header['streams'])}")
    ends = list(itertools.accumulate(header["streams"]))
    return header, [body[a:b] for a, b in zip([0] + ends, ends)]


def check_header(header, name):
    """Type and range of every field the model needs, and their agreement."""
    if not isinstance(header, dict) or header.get("model") not in NEEDS:
        raise RunError(f"{name}: its header names no model this script knows")
    for key in NEEDS[header["model"]]:
        kind, lo, hi = FIELDS[key]
        value = header.get(key)
        if type(value) is not kind:  # a bool is no int here, a float no int
            raise RunError(f"{name}: header field {key!r} is {str(value)[:40]!r}, not a {kind.__name__}")
        if not lo <= (value if kind is int else len(value)) <= hi:
            raise RunError(f"{name}: header field {key!r} is out of range ({lo} to {hi})")
    kind, streams = header["model"], header.get("streams")
    want = -(-header["length"] // header["chunk"]) if kind == "neural" else 1  # streams of chunk bytes
    if kind != "stored" and (len(streams) != want or not all(type(b) is int and b >= 0 for b in streams)):
        raise RunError(f"{name}: header field 'streams' is not the {want} payload sizes it must be")


def sample_bytes(model, n, seed=0, device="cpu", k=24):
    """Decode n bytes from uniform random bits with a GRU or a byte model: an exact sample
    of the (quantised) model, since each symbol's slice of [0, 1) has its probability."""
    noise = np.random.default_rng(seed).bytes(64 * n + 64)
    if isinstance(model, ByteGRU):
        return neural_code(model, device, [ArithmeticDecoder(noise)], stream_lengths(n, 1), k, None, "sample")
    return decode_with(model, noise, n)


# ----------------------------------------------------------------------------- the experiment: a GRU on the standard library

def corpus(root):
    """(train bytes, held-out bytes): the .py files under root (site-packages skipped) in
    sorted path order, 1 file in 20 held out by a CRC32 of its relative path."""
    start, root, files = time.time(), Path(root), []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "site-packages"]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    parts = ([], [])  # train, held out
    for p in sorted(files):
        parts[zlib.crc32(p.relative_to(root).as_posix().encode()) % 20 == 0].append(p.read_bytes())
    train, heldout = (b"".join(part) for part in parts)
    if not train or not heldout:
        raise RunError(f"--data-dir {root}: too few .py files for a train/held-out split "
                       f"(found {len(files)}; one in 20 is held out)")
    print(f"corpus: {len(files)} files under {root}, {len(train):,} bytes to train on, "
          f"{len(heldout):,} held out ({time.time() - start:.1f}s)", flush=True)
    return train, heldout


def train_model(model, text, steps, batch_size=32, seq_len=256, lr=3e-3, device="cpu", bf16=False):
    """Adam on random windows of the training text, `steps` optimizer steps."""
    data = torch.from_numpy(np.frombuffer(text, np.uint8).copy())
    if len(data) < seq_len + 2:
        raise RunError(f"the training text has {len(data)} bytes, fewer than --seq-len + 2")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Learning-rate multiplier: linear warm-up over 50 steps, then cosine decay to a tenth.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))))
    offsets = torch.arange(seq_len + 1)
    progress = Progress(steps)
    model.train()
    for step in range(1, steps + 1):
        # Random windows of seq_len + 1 bytes: inputs x[:, :-1], targets x[:, 1:].
        start = torch.randint(0, len(data) - seq_len - 1, (batch_size, 1))
        window = data[start + offsets].long().to(device)      # (B, T + 1)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            logits, _ = model(window[:, :-1])                  # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), window[:, 1:].reshape(-1)) / math.log(2)  # bits/byte
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        progress(step, batch_size * seq_len, bits_per_byte=loss.detach())  # read only to print


@torch.no_grad()
def evaluate_bits(model, text, device, max_streams=256):
    """Teacher-forced -log2 P(text) in bits under the float model, with the
    coder's stream layout (what the ideal neural code length would be)."""
    model.eval()
    lengths = stream_lengths(len(text), max_streams)
    chunk = lengths[0]
    x = np.full((len(lengths), chunk), START, np.int64)
    x.reshape(-1)[:len(text)] = np.frombuffer(text, np.uint8)
    x = torch.from_numpy(x).to(device)                              # (B, L)
    inputs = torch.cat([torch.full_like(x[:, :1], START), x[:, :-1]], 1)
    valid = (torch.arange(chunk, device=device)[None] < torch.tensor(lengths, device=device)[:, None])
    bits = torch.zeros((), dtype=torch.float64, device=device)
    h, progress = None, Progress(chunk, "evaluate")
    for t in range(0, chunk, 512):
        logits, h = model(inputs[:, t:t + 512], h)
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, t:t + 512], reduction="none")
        bits += (nll * valid[:, t:t + 512]).sum().double() / math.log(2)
        progress(min(t + 512, chunk), len(lengths) * 512)
    return bits.item()


def run_train(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out or (Path(args.ckpt).parent / "sample_only" if args.sample_only else f"runs/{SCRIPT}"))
    if args.sample_only and (out / "model.pt").exists():
        raise RunError(f"--out {out} holds a training run (model.pt); --sample-only writes elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    train_text, heldout = corpus(args.data_dir)
    test_text = heldout[:args.test_limit or None]
    steps, seconds = 0, 0.0
    if args.sample_only:
        model = load_gru(args.ckpt, device)[0]
    else:
        model, start, steps = ByteGRU(args.hidden, args.embed).to(device), time.time(), args.steps
        train_model(model, train_text, steps, args.batch_size, args.seq_len, args.lr, device, args.bf16)
        seconds = time.time() - start  # the last progress line read the loss: the device is done
        save_checkpoint(out / "model.pt", {"hidden": args.hidden, "embed": args.embed}, model.state_dict())
    bits = evaluate_bits(model, test_text, device, args.streams)
    # A real round trip through the neural coder on the first held-out bytes (never stored mode).
    part = test_text[:args.check_bytes]
    lengths = stream_lengths(len(part), args.streams)
    encs = [ArithmeticEncoder() for _ in lengths]
    neural_code(model, device, encs, lengths, args.k, part, "check encode")
    decs = [ArithmeticDecoder(e.finish()) for e in encs]
    if neural_code(model, device, decs, lengths, args.k, None, "check decode") != part:
        raise RunError("the neural coder's round trip failed")
    text = sample_bytes(model, args.num_samples, args.seed, device, args.k)
    atomic_write(out / "samples.txt", lambda f: f.write(text))
    print("sample (decoded from random bits):\n" + text.decode("utf-8", "replace"))
    metrics = {"heldout_bits_per_byte": round(bits / max(len(test_text), 1), 4),
               "heldout_bytes": len(test_text), "check_bytes": len(part),
               "check_coded_bytes": sum(len(d.data) for d in decs), "train_bytes": len(train_text),
               "train_seconds": round(seconds, 1), "steps": steps, "device": str(device)}
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return metrics


# ----------------------------------------------------------------------------- main

COMMANDS = {"train": "train the byte-level GRU on Python source (the default command)",
            "compress": "code the file IN into the archive OUT with a model",
            "decompress": "decode the archive IN back into the file OUT",
            "sample": "decode random bits with the GRU: an exact sample of the model"}


def coder_flags():
    """The coder's and the models' flags, shared by every command."""
    p = argparse.ArgumentParser(add_help=False)
    add, between = p.add_argument, lambda lo, hi: checked(int, lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    add("--seed", type=nonnegative_int, default=0, help="seeds training and sampling")
    add("--ckpt", default=DEFAULT_CKPT, help="neural: the GRU's model.pt")
    add("--k", type=between(8, 30), default=24, help="neural: its frequencies sum to 2^k")
    add("--streams", type=between(1, MAX_STREAMS), default=256,
        help=f"neural: most streams coded in lock-step, each of >= {MIN_CHUNK} bytes")
    add("--order", type=between(0, MAX_ORDER), default=10, help="context: longest PPM context, in bytes")
    add("--memory-mb", type=between(1, 1 << 20), default=700,
        help="context: MB its tables may hold (xz -9 asks 674), past which it starts afresh; "
        "written in the archive, and decompress refuses an archive that asks for more")
    return p


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train"] + argv  # the default run trains the neural model
    fmt, common = argparse.ArgumentDefaultsHelpFormatter, coder_flags()
    p = argparse.ArgumentParser(formatter_class=fmt, description="Arithmetic coding: a model's "
                                "P(x) as a lossless compressor, with order-0, PPM and GRU models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmd = {name: sub.add_parser(name, parents=[common], formatter_class=fmt, help=text, description=text)
           for name, text in COMMANDS.items()}
    add = cmd["train"].add_argument
    add("--data-dir", default=sysconfig.get_paths()["stdlib"], help="a folder of .py files")
    add("--out", help=f"output folder (None: runs/{SCRIPT}, or sample_only/ beside --ckpt)")
    add("--steps", type=positive_int, default=1200, help="optimizer steps")
    add("--batch-size", type=positive_int, default=32, help="windows per step")
    add("--seq-len", type=positive_int, default=256, help="bytes per training window")
    add("--lr", type=positive_float, default=3e-3, help="Adam's peak learning rate")
    add("--hidden", type=positive_int, default=512, help="GRU units H")
    add("--embed", type=positive_int, default=64, help="byte embedding size")
    add("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast in training")
    add("--num-samples", type=nonnegative_int, default=600, help="bytes to sample")
    add("--test-limit", type=nonnegative_int, default=1_000_000, help="held-out bytes evaluated (0: all)")
    add("--check-bytes", type=nonnegative_int, default=20_000,
        help="held-out bytes sent through the neural coder and back, as a check")
    add("--sample-only", action="store_true", help="no training: load --ckpt, evaluate, sample")
    for name in ("compress", "decompress"):
        cmd[name].add_argument("input", metavar="IN", help="the file to read")
        cmd[name].add_argument("output", metavar="OUT", help="the file to write")
        cmd[name].add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    cmd["compress"].add_argument("--model", choices=["order0", "context", "neural"], default="context",
                                 help="the model of P(x_t | x_<t)")
    cmd["decompress"].add_argument("--max-size", type=nonnegative_int,
                                   help="refuse an archive that decodes to more bytes (None: no cap)")
    cmd["sample"].add_argument("--num-samples", type=nonnegative_int, default=400, help="bytes to sample")
    args = p.parse_args(argv)
    for name in ("hidden", "embed", "steps", "batch_size", "seq_len", "lr"):
        if getattr(args, "sample_only", False) and getattr(args, name) != cmd["train"].get_default(name):
            p.error(f"--{name.replace('_', '-')} shapes or trains a model; --sample-only uses --ckpt's")
    return args


def run(args):
    if args.command == "train":
        return run_train(args)
    if args.command == "sample":
        device = pick_device(args.device)
        text = sample_bytes(load_gru(args.ckpt, device)[0], args.num_samples, args.seed, device, args.k)
        print(text.decode("utf-8", "replace"))
        return text
    data, start = Path(args.input).read_bytes(), time.time()
    if args.command == "compress":
        result = compress(data, args.model, order=args.order, memory_mb=args.memory_mb, ckpt=args.ckpt,
                          device=args.device, k=args.k, streams=args.streams)
    else:
        result = decompress(data, args.ckpt, args.device, args.max_size, args.memory_mb, args.input)
    if Path(args.output).exists() and not args.force:
        raise RunError(f"{args.output} exists; pass --force to overwrite it")
    atomic_write(args.output, lambda f: f.write(result))
    info = {"command": args.command, "in_bytes": len(data), "out_bytes": len(result),
            "seconds": round(time.time() - start, 3)}
    print(json.dumps(info))
    return info


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (RunError, OSError) as e:
        sys.exit(f"error: {e}")


# ============================================================================ appendix: plumbing every script repeats

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


if __name__ == "__main__":
    main()
