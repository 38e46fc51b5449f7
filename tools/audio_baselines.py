"""Markov baselines for wavenet.py's test bits/sample: what a model without a network scores.

On the same data and split as wavenet.py (a folder of mono 16-bit 8 kHz wav files named
{digit}_{speaker}_{index}.wav, index 0-4 the test split, such as FSDD's recordings/),
mu-law-quantised to Q = 256 classes as wavenet.py does, two models are fitted on the
training recordings with add-one smoothing and scored on the test recordings:

    order 0:  P(x_t) = (n(x_t) + 1) / (N + Q)
    order 1:  P(x_t | x_{t-1}) = (n(x_{t-1}, x_t) + 1) / (n(x_{t-1}, .) + Q)

(order 1 codes each recording's first sample with order 0). Bits per sample =
-sum log2 P / number of test samples. Prints, and with --out writes, a JSON line:

    python tools/audio_baselines.py --data-dir free-spoken-digit-dataset/recordings

Imports no script of this project. On FSDD: order 0 7.18, order 1 5.45 bits/sample.
"""

import argparse
import json
import math
import re
import sys
import wave
from pathlib import Path

import numpy as np

Q = 256
NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def mu_law_encode(x, mu=Q - 1):
    """Waveform in [-1, 1] -> classes 0..mu, as wavenet.py (float32 throughout)."""
    x = np.clip(np.asarray(x, np.float32), -1, 1)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.float32(math.log1p(mu))
    return np.floor((y + 1) / 2 * mu + 0.5).astype(np.int64)


def load_split(data_dir):
    """(train, test): lists of class arrays (T,) int64; index 0-4 is test."""
    train, test = [], []
    for path in sorted(Path(data_dir).glob("*.wav")):
        m = NAME.match(path.name)
        if m is None:
            sys.exit(f"error: {path}: not named {{digit}}_{{speaker}}_{{index}}.wav")
        with wave.open(str(path), "rb") as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, 8000):
                sys.exit(f"error: {path}: expected mono 16-bit 8000 Hz audio")
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        (test if int(m[3]) < 5 else train).append(mu_law_encode(pcm.astype(np.float32) / 32768.0))
    if not train or not test:
        sys.exit(f"error: --data-dir {data_dir}: needs wav files with index 0-4 (test) and 5+ (train)")
    return train, test


def markov_bits(train, test):
    """(order-0, order-1) bits per sample on test, fitted on train with add-one smoothing."""
    p0 = (np.bincount(np.concatenate(train), minlength=Q) + 1.0) / (sum(map(len, train)) + Q)
    pairs = np.bincount(np.concatenate([c[:-1] * Q + c[1:] for c in train]), minlength=Q * Q)
    pairs = pairs.reshape(Q, Q)  # pairs[previous, next]
    p1 = (pairs + 1.0) / (pairs.sum(1, keepdims=True) + Q)
    bits0 = bits1 = 0.0
    for c in test:
        bits0 -= np.log2(p0[c]).sum()
        bits1 -= np.log2(p0[c[0]]) + np.log2(p1[c[:-1], c[1:]]).sum()
    n = sum(map(len, test))
    return bits0 / n, bits1 / n


def main(argv=None):
    p = argparse.ArgumentParser(description="Order-0 and order-1 Markov bits/sample on wavenet.py's "
                                "test split.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="data/fsdd/recordings", help="folder of FSDD-named wav files")
    p.add_argument("--out", help="also write the JSON to this file")
    args = p.parse_args(argv)
    train, test = load_split(args.data_dir)
    bits0, bits1 = markov_bits(train, test)
    result = {"order0_bits_per_sample": round(bits0, 4), "order1_bits_per_sample": round(bits1, 4),
              "train_recordings": len(train), "test_recordings": len(test),
              "test_samples": sum(map(len, test))}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
