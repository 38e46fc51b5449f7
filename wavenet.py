"""WaveNet on raw audio: one 8 kHz sample at a time, conditioned on the spoken digit.

WaveNet (van den Oord et al. 2016, "WaveNet: A Generative Model for Raw Audio")
factorises a waveform into next-sample predictions,

    P(x | h) = prod_t P(x_t | x_1 .. x_{t-1}, h),

each factor a 256-way softmax over the mu-law-quantised next value, and trains by
teacher forcing: loss = -sum_t log P(x_t | x_<t, h), reported in bits per sample.

  * mu-law (mu = 255): y = sign(x) ln(1 + mu |x|) / ln(1 + mu), then 256 levels;
    quiet sounds get fine steps, loud ones coarse steps, as the ear hears them.
  * Causal convolutions: the logit at t sees only x_<t (the input is shifted by one).
  * Dilated stacks (dilations 1, 2, 4, ... repeated): the receptive field doubles
    per layer, so 2 stacks of 1..256 see 1,024 samples (128 ms) with 18 layers.
  * Gated units: z = tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h), then 1x1
    convolutions to a residual (added to x) and a skip (summed over layers) output;
    head: ReLU - 1x1 - ReLU - 1x1 -> 256 logits.
  * Global conditioning h = embedding(digit) + embedding(speaker), added as a bias
    to every gate: one model, ten digits, six voices.
  * Fast generation (Paine et al. 2016, "Fast Wavenet Generation Algorithm"): each
    layer keeps a queue of its last `dilation` inputs, so a new sample costs
    O(layers) instead of a forward pass over the whole receptive field.

Data: the Free Spoken Digit Dataset (FSDD; Jackson et al., CC BY-SA 4.0), 3,000 mono
8 kHz recordings {digit}_{speaker}_{index}.wav; index 0-4 is test, 5-49 train (the
dataset's own split). Downloaded into data/fsdd/recordings when missing. `--data tones`
swaps in deterministic synthetic harmonic tones (one pitch per "digit") for tests
and zero-download smoke runs.

Shape legend: B batch (streams), C residual channels, S skip channels, E conditioning
dims, T time (samples), Q = 256 mu-law classes.

Run:   python wavenet.py                       (15-18 minutes on a 2-core CPU)
       python wavenet.py --data tones --steps 300
       python wavenet.py --sample-only --ckpt runs/wavenet/model.pt --temperature 0.9
       python wavenet.py ... --resume     (go on after a stop; state saved every 500 steps)
Writes runs/wavenet/: samples_digit{0..9}.wav (one second each), samples.npy (int16
PCM, (N, T)), spectrograms.png (per digit: a real test recording, then the samples),
model.pt, metrics.json (test_nll_bits_per_sample, receptive field,
gen_samples_per_second_fast / _naive, judge_sample_accuracy, ...).

Nobody listens inside a test run, so a stand-in listener judges the samples: a small
spectrogram classifier trained on the real training recordings (judge_* metrics;
it names 97% of the real test recordings right).

Default run, measured on a 2-core AMD EPYC (17m43s wall, 982 s training): 64 residual
/ 128 skip channels, 2,400 steps of 8 x 2,000-sample crops, bf16 autocast, cosine lr;
3.98 bits/sample on the 300 test recordings, against 7.18 for symbol frequencies
(order 0) and 5.45 for previous symbol -> next (order 1). It generates ten one-second
digits at once in 7.6 s, 148x faster than naive recomputation; the judge hears the
requested digit in 5 of the 10 samples (chance: 1).
Longer run (same machine, 92m15s wall, 5,280 s training): --steps 6000 --crop 4000
--max-dilation 1024 (receptive field 4,096 samples = 512 ms, 757k parameters): 3.75
bits/sample; thirty samples in 17 s, 2,353x faster than naive recomputation; the judge
hears the requested digit in 20 of 30 (chance: 3).
"""

import argparse
import io
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import tarfile
import time
import urllib.request
import wave
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "wavenet"
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

SAMPLE_RATE = 8000
Q = 256  # mu-law classes
FSDD_URL = ("https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/"
            "v1.0.10.tar.gz")
FSDD_COUNT = 3000
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def mu_law_encode(x, mu=Q - 1):
    """Waveform in [-1, 1] -> classes 0..mu:  y = sign(x) ln(1 + mu|x|) / ln(1 + mu),
    then y in [-1, 1] is rounded to the nearest of mu + 1 evenly spaced levels."""
    x = torch.as_tensor(x, dtype=torch.float32).clamp(-1.0, 1.0)
    y = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return torch.floor((y + 1) / 2 * mu + 0.5).long()


def mu_law_decode(q, mu=Q - 1):
    """Classes -> waveform, the inverse map:  x = sign(y) ((1 + mu)^|y| - 1) / mu."""
    y = 2 * torch.as_tensor(q, dtype=torch.float32) / mu - 1
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu


def read_wav(path):
    """A mono 16-bit wav file as float32 in [-1, 1)."""
    try:
        with wave.open(str(path), "rb") as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, SAMPLE_RATE):
                raise RunError(f"{path}: expected mono 16-bit {SAMPLE_RATE} Hz audio")
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    except (wave.Error, EOFError) as e:
        raise RunError(f"{path}: not a readable wav file ({e})") from None
    return pcm.astype(np.float32) / 32768.0


def write_wav(path, pcm):
    """int16 samples (T,) -> mono 8 kHz wav, written atomically."""
    def write(f):
        with wave.open(f, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(np.asarray(pcm, "<i2").tobytes())
    atomic_write(path, write)


def download_fsdd(dest):
    """Fetch the pinned release archive; keep only recordings/*.wav; check the count;
    move the folder into place in one rename, so a failure leaves nothing behind."""
    print(f"{dest} has no recordings; downloading FSDD from {FSDD_URL}", file=sys.stderr)
    hint = f"put the dataset's {FSDD_COUNT:,} recordings/*.wav files into {dest}/"
    try:
        with urllib.request.urlopen(FSDD_URL, timeout=60) as r:
            blob = r.read()
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise RunError(f"no FSDD recordings in {dest} and the download failed "
                       f"({getattr(e, 'reason', e)}); {hint} (from {FSDD_URL})") from None
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for m in tar.getmembers():
                # Never tar.extract: only regular files <top>/recordings/<strict name>
                # are read, and written under their bare name (no path traversal).
                parts = m.name.split("/")
                if (m.isfile() and len(parts) == 3 and parts[1] == "recordings"
                        and FSDD_NAME.match(parts[2])):
                    (tmp / parts[2]).write_bytes(tar.extractfile(m).read())
        n = len(list(tmp.glob("*.wav")))
        if n != FSDD_COUNT:
            raise RunError(f"the FSDD archive held {n} recordings, not {FSDD_COUNT}; {hint}")
        if dest.is_dir():
            dest.rmdir()  # empty (we only download into an empty or missing folder)
        os.replace(tmp, dest)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise RunError(f"could not unpack the FSDD archive ({e}); {hint}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_fsdd(data_dir):
    """Lists of (classes (T,) uint8, digit, speaker name) for train (index 5-49) and
    test (index 0-4)."""
    data_dir = Path(data_dir)
    files = sorted(data_dir.glob("*.wav")) if data_dir.is_dir() else []
    if not files:
        download_fsdd(data_dir)
        files = sorted(data_dir.glob("*.wav"))
    train, test = [], []
    for path in files:
        m = FSDD_NAME.match(path.name)
        if m is None:
            continue
        classes = mu_law_encode(read_wav(path)).to(torch.uint8).numpy()
        (test if int(m[3]) < 5 else train).append((classes, int(m[1]), m[2]))
    if len(train) + len(test) != FSDD_COUNT:
        print(f"warning: {data_dir} holds {len(train) + len(test)} FSDD recordings, "
              f"not {FSDD_COUNT}", file=sys.stderr)
    if not train or not test:
        raise RunError(f"{data_dir}: need FSDD files {{digit}}_{{speaker}}_{{index}}.wav with "
                       "index 0-4 (test) and 5-49 (train)")
    return train, test


def make_tones(per_class=10, length=2000):
    """Deterministic stand-in for FSDD: 'digit' d is a harmonic tone at 120 * 2^(d/6) Hz
    with 5-6 Hz vibrato; 'speaker' sets the brightness (how fast harmonics fall off).
    Index 0-1 of each (digit, speaker) is test, the rest train."""
    t = np.arange(length) / SAMPLE_RATE
    envelope = np.minimum(1, np.minimum(t / 0.02, (t[-1] - t) / 0.06))
    train, test = [], []
    for digit in range(10):
        for s, speaker in enumerate(("bright", "dark")):
            for i in range(per_class):
                rng = np.random.default_rng(1000 * digit + 100 * s + i)
                f0 = 120 * 2 ** (digit / 6)
                freq = f0 * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(5, 6) * t
                                                + rng.uniform(0, 2 * np.pi)))
                phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
                wave_ = sum(np.sin(k * phase) / k ** (1 + s) for k in range(1, 5))
                audio = rng.uniform(0.3, 0.5) * envelope * wave_ / 1.6
                audio = audio + 0.002 * rng.standard_normal(length)
                classes = mu_law_encode(audio).to(torch.uint8).numpy()
                (test if i < 2 else train).append((classes, digit, speaker))
    return train, test


def random_crops(data, batch_size, crop, rng, speakers):
    """B crops of `crop` samples; recordings drawn in proportion to their length so that
    every training sample is equally likely (as every test sample counts equally).
    Short recordings are padded at the end and masked out of the loss."""
    lengths = np.array([len(c) for c, _, _ in data], dtype=np.float64)
    idx = rng.choice(len(data), batch_size, p=lengths / lengths.sum())
    x = np.full((batch_size, crop), Q // 2, np.int64)
    mask = np.zeros((batch_size, crop), np.float32)
    for b, i in enumerate(idx):
        classes = data[i][0]
        start = rng.integers(0, max(len(classes) - crop, 0) + 1)
        piece = classes[start:start + crop]
        x[b, :len(piece)], mask[b, :len(piece)] = piece, 1.0
    digit = np.array([data[i][1] for i in idx])
    speaker = np.array([speakers.index(data[i][2]) for i in idx])
    return (torch.from_numpy(x), torch.from_numpy(digit), torch.from_numpy(speaker),
            torch.from_numpy(mask))


def markov_baselines(train, test):
    """Reference points: order-0 (symbol frequencies) and order-1 (previous symbol ->
    next) models fitted on train with add-one smoothing, in bits/sample on test."""
    tr = np.concatenate([c for c, _, _ in train]).astype(np.int64)
    p0 = (np.bincount(tr, minlength=Q) + 1.0) / (len(tr) + Q)
    pairs = np.bincount(np.concatenate([c[:-1].astype(np.int64) * Q + c[1:]
                                        for c, _, _ in train]), minlength=Q * Q)
    p1 = (pairs.reshape(Q, Q) + 1.0) / (pairs.reshape(Q, Q).sum(1, keepdims=True) + Q)
    bits0 = bits1 = 0.0
    n = 0
    for c, _, _ in test:
        c = c.astype(np.int64)
        bits0 -= np.log2(p0[c]).sum()
        bits1 -= np.log2(p0[c[0]]) + np.log2(p1[c[:-1], c[1:]]).sum()
        n += len(c)
    return bits0 / n, bits1 / n


# ----------------------------------------------------------------------------- model

class CausalConv1d(nn.Conv1d):
    """Conv1d whose output at t sees inputs t - (k-1) d .. t: pad (k-1) d zeros on the left."""

    def __init__(self, c_in, c_out, kernel_size=2, dilation=1):
        super().__init__(c_in, c_out, kernel_size, dilation=dilation)
        self.left = (kernel_size - 1) * dilation

    def forward(self, x):  # (B, C_in, T) -> (B, C_out, T)
        return super().forward(F.pad(x, (self.left, 0)))


class ResidualBlock(nn.Module):
    """x -> x + W_r z,  skip = W_s z,  z = tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h)."""

    def __init__(self, channels, skip_channels, dilation, cond_channels):
        super().__init__()
        self.channels, self.dilation = channels, dilation
        # W_f and W_g as one convolution with 2C outputs (filter half, gate half).
        self.dilated = CausalConv1d(channels, 2 * channels, 2, dilation)
        self.cond = nn.Linear(cond_channels, 2 * channels, bias=False) if cond_channels else None
        # W_r and W_s as one 1x1 convolution: C residual + S skip outputs.
        self.out = nn.Conv1d(channels, channels + skip_channels, 1)

    def forward(self, x, h):  # x (B, C, T), h (B, E) or None
        a = self.dilated(x)  # (B, 2C, T)
        if h is not None:
            a = a + self.cond(h)[:, :, None]  # V h: the same bias at every time step
        f, g = a.chunk(2, 1)
        z = torch.tanh(f) * torch.sigmoid(g)  # (B, C, T)
        r, skip = self.out(z).split([self.channels, self.out.out_channels - self.channels], 1)
        return x + r, skip


class WaveNet(nn.Module):
    def __init__(self, channels=32, skip_channels=64, stacks=2, max_dilation=256,
                 n_digits=10, n_speakers=0, cond_channels=16):
        super().__init__()
        self.dilations = [2 ** i for i in range(int(math.log2(max_dilation)) + 1)] * stacks
        # One-hot input times a matrix = an embedding of the 256 classes.
        self.embed = nn.Embedding(Q, channels)
        self.input_conv = CausalConv1d(channels, channels, 2)
        e = cond_channels if n_digits else 0
        self.digit_embed = nn.Embedding(n_digits, e) if e else None
        self.speaker_embed = nn.Embedding(n_speakers, e) if e and n_speakers else None
        self.blocks = nn.ModuleList(ResidualBlock(channels, skip_channels, d, e)
                                    for d in self.dilations)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(skip_channels, skip_channels, 1),
                                  nn.ReLU(), nn.Conv1d(skip_channels, Q, 1))

    def receptive_field(self):
        """Number of past samples the logit at t depends on: x_{t-R} .. x_{t-1}.
        The input conv (kernel 2) sees 2 samples; each dilated layer adds its dilation."""
        return 2 + sum(self.dilations)

    def condition(self, digit, speaker):
        """h = embedding(digit) + embedding(speaker): (B, E), or None when unconditional."""
        if self.digit_embed is None:
            return None
        h = self.digit_embed(digit)
        if self.speaker_embed is not None:
            h = h + self.speaker_embed(speaker)
        return h

    def forward_embedded(self, e, h):
        """Logits (B, Q, T) from embedded inputs e (B, C, T); logit t predicts x_t."""
        x = F.pad(e, (1, 0))[:, :, :-1]  # shift right by one: position t holds x_{t-1}
        x = self.input_conv(x)
        skips = 0
        for block in self.blocks:
            x, skip = block(x, h)
            skips = skips + skip  # (B, S, T)
        return self.head(skips)

    def forward(self, x, digit=None, speaker=None):  # x (B, T) classes -> (B, Q, T)
        return self.forward_embedded(self.embed(x).transpose(1, 2), self.condition(digit, speaker))


def receptive_field(model):
    """(samples, milliseconds at 8 kHz) that one prediction looks back over."""
    r = model.receptive_field()
    return r, 1000.0 * r / SAMPLE_RATE


# ----------------------------------------------------------------------------- objective

def nll_loss(logits, x, mask=None):
    """-log P(x_t | x_<t, h) averaged over the (unmasked) samples, in nats."""
    nll = F.cross_entropy(logits.float(), x, reduction="none")  # (B, T)
    if mask is None:
        return nll.mean()
    return (nll * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------- fast generation

class FastGenerator:
    """Paine et al. (2016): generate with per-layer queues instead of recomputation.

    Layer l at time t needs its input at t and at t - d_l. A queue of the last d_l
    inputs (a ring buffer indexed by t mod d_l, zeros at first = the causal padding)
    provides x_{t-d}, so each new sample costs one small matrix product per layer."""

    def __init__(self, model, digit=None, speaker=None, batch=None):
        p = next(model.parameters())
        h = model.condition(digit, speaker)
        self.B = batch if h is None else len(h)
        B, C = self.B, model.embed.embedding_dim
        self.model, self.t = model, 0

        def taps(conv):  # (C_out, C_in, 2) -> (2 C_in, C_out): [past; now] @ W
            return torch.cat([conv.weight[:, :, 0], conv.weight[:, :, 1]], 1).t().contiguous()

        self.in_w, self.in_b = taps(model.input_conv), model.input_conv.bias
        self.in_prev = torch.zeros(B, C, device=p.device, dtype=p.dtype)
        self.layers = []
        for block in model.blocks:
            bias = block.dilated.bias.expand(B, -1)
            if h is not None:
                bias = bias + block.cond(h)  # V h, fixed for the whole stream
            queue = torch.zeros(block.dilation, B, C, device=p.device, dtype=p.dtype)
            self.layers.append((block.dilation, queue, taps(block.dilated), bias.contiguous(),
                                block.out.weight[:, :, 0].t().contiguous(), block.out.bias))
        self.head = [(m.weight[:, :, 0], m.bias) for m in model.head if isinstance(m, nn.Conv1d)]

    def step(self, e):
        """e (B, C): embedding of the previous sample x_{t-1} (zeros at t = 0).
        Returns the logits (B, Q) of x_t."""
        C, t = self.in_prev.shape[1], self.t
        x = torch.addmm(self.in_b, torch.cat([self.in_prev, e], 1), self.in_w)
        self.in_prev = e
        skips = 0
        for d, queue, w, bias, w_out, b_out in self.layers:
            past = queue[t % d]  # this layer's input at t - d
            a = torch.addmm(bias, torch.cat([past, x], 1), w)  # (B, 2C); cat copies `past`
            queue[t % d] = x  # ... so the slot can now hold the input at t
            f, g = a.chunk(2, 1)
            out = torch.addmm(b_out, torch.tanh(f) * torch.sigmoid(g), w_out)
            x = x + out[:, :C]
            skips = skips + out[:, C:]
        (w1, b1), (w2, b2) = self.head
        self.t += 1
        return F.linear(F.relu(F.linear(F.relu(skips), w1, b1)), w2, b2)


@torch.no_grad()
def fast_logits(model, x, digit=None, speaker=None):
    """Teacher-forced logits (B, Q, T) computed step by step through the caches: must
    equal model(x, digit, speaker), which the tests check."""
    gen = FastGenerator(model, digit, speaker, batch=len(x))
    e = model.embed(x)  # (B, T, C)
    prev = torch.zeros_like(e[:, 0])
    out = []
    for t in range(x.shape[1]):
        out.append(gen.step(prev))
        prev = e[:, t]
    return torch.stack(out, 2)


def sample_next(logits, temperature, generator):
    """Draw x_t ~ softmax(logits / temperature): (B, Q) -> (B,)."""
    probs = F.softmax(logits.float() / temperature, dim=1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, digit, speaker, n, temperature=1.0, seed=0, show_progress=True):
    """Sample B streams of n classes at once with the fast generator: (B, n) classes."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    gen = FastGenerator(model, digit, speaker, batch=len(digit))
    progress = Progress(n, label="generate") if show_progress else None
    e = torch.zeros(gen.B, model.embed.embedding_dim, device=device)
    out = torch.empty(gen.B, n, dtype=torch.long, device=device)
    for t in range(n):
        out[:, t] = sample_next(gen.step(e), temperature, generator)
        e = model.embed(out[:, t])
        if progress:
            progress.update(t + 1, gen.B)
    return out


@torch.no_grad()
def naive_generate(model, digit, speaker, n, temperature=1.0, seed=0, prefix=None):
    """The slow way, for timing: every new sample runs the network over the whole
    receptive field again. `prefix` (B, P) classes lets the timing start at full width."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    r = model.receptive_field()
    x = prefix if prefix is not None else torch.empty(len(digit), 0, dtype=torch.long, device=device)
    for _ in range(n):
        window = F.pad(x[:, -r:], (0, 1))  # last R samples + a slot for x_t (never read)
        logits = model(window, digit, speaker)[:, :, -1]
        x = torch.cat([x, sample_next(logits, temperature, generator)[:, None]], 1)
    return x[:, x.shape[1] - n:]


# ----------------------------------------------------------------------------- train / evaluate

def autocast(device, precision):
    """bf16 autocast for the convolutions (fast on CPUs with AMX/AVX512-bf16 and on GPUs);
    the loss is always computed in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(model, test, speakers, device, max_tokens=1 << 17):
    """Teacher-forced NLL over every test recording, in bits per sample. Recordings are
    sorted by length and padded into batches of about max_tokens samples (masked)."""
    model.eval()
    order = sorted(range(len(test)), key=lambda i: len(test[i][0]))
    total_nats, count, i = 0.0, 0, 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(test[order[j]][0]) <= max_tokens:
            j += 1
        batch = [test[k] for k in order[i:j]]
        longest = max(len(c) for c, _, _ in batch)
        x = torch.full((len(batch), longest), Q // 2, dtype=torch.long)
        mask = torch.zeros(len(batch), longest)
        for b, (c, _, _) in enumerate(batch):
            x[b, :len(c)], mask[b, :len(c)] = torch.from_numpy(c.astype(np.int64)), 1.0
        digit = torch.tensor([d for _, d, _ in batch], device=device)
        speaker = torch.tensor([speakers.index(s) for _, _, s in batch], device=device)
        x, mask = x.to(device), mask.to(device)
        nll = F.cross_entropy(model(x, digit, speaker).float(), x, reduction="none")
        total_nats += (nll * mask).sum().item()
        count += int(mask.sum().item())
        i = j
    return total_nats / count / math.log(2), count


def learning_rate(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to zero: most of the gain of a short run
    comes from the final low-lr phase."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


# Settings that a resumed run must share with the run it continues.
RESUME_MUST_MATCH = ("steps", "batch_size", "crop", "lr", "warmup", "channels", "skip_channels",
                     "cond_channels", "stacks", "max_dilation", "condition", "precision",
                     "seed", "data")


def train(model, data, speakers, args, device, out=None, resume=False):
    """Adam with warm-up and cosine decay on random crops. Every --save-every steps the
    weights go to out/model.pt and everything training needs to go on (weights, Adam's
    moments, step, the crop sampler's random state) to out/train_state.pt; with
    resume=True training starts from there and ends with the weights an uninterrupted
    run would have had. Returns (steps done, the step it started at)."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    state_path = Path(out) / "train_state.pt" if out is not None else None
    first_step = 0
    if resume:
        first_step = load_train_state(state_path, model, opt, rng, args)
        print(f"resumed from {state_path} at step {first_step:,} of {args.steps:,}", flush=True)
    progress = Progress(args.steps - first_step)
    model.train()
    for step in range(first_step, args.steps):
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x, digit, speaker, mask = (t.to(device) for t in
                                   random_crops(data, args.batch_size, args.crop, rng, speakers))
        with autocast(device, args.precision):
            logits = model(x, digit, speaker)  # (B, Q, T)
        loss = nll_loss(logits, x, mask)
        check_finite(step, nll=loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # rare spikes from silence/clicks
        opt.step()
        progress.update(step + 1 - first_step, len(x), nll_bits=loss.item() / math.log(2), lr=lr)
        if (out is not None and args.save_every and (step + 1) % args.save_every == 0
                and step + 1 < args.steps):
            save_checkpoint(Path(out) / "model.pt", model.state_dict(),
                            dict(vars(args), speakers=speakers))
            save_train_state(state_path, model, opt, rng, step + 1, args)
    if state_path is not None and state_path.exists():
        state_path.unlink()  # finished: nothing left to resume
    return args.steps, first_step


def save_train_state(path, model, opt, rng, step, args):
    state = {"script": SCRIPT, "config": vars(args), "step": step,
             "model": model.state_dict(), "opt": opt.state_dict(),
             # numpy's generator state holds 128-bit integers: kept as JSON text.
             "rng": json.dumps(rng.bit_generator.state)}
    atomic_write(path, lambda f: torch.save(state, f))


def load_train_state(path, model, opt, rng, args):
    """Restore what save_train_state wrote; return the step to go on from."""
    if path is None or not path.is_file():
        raise RunError(f"--resume: {path} not found (it is written every --save-every steps "
                       f"and removed when training ends)")
    state = load_checkpoint(path)
    differ = [k for k in RESUME_MUST_MATCH if state["config"].get(k) != vars(args).get(k)]
    if differ:
        raise RunError(f"--resume: {path} was written with different "
                       + ", ".join(f"--{k.replace('_', '-')} ({state['config'].get(k)})"
                                   for k in differ))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    rng.bit_generator.state = json.loads(state["rng"])
    return state["step"]


def rms_dbfs(audio, frame=400):
    """Mean RMS level (dBFS) of 50 ms frames, and the fraction of frames above -40 dBFS
    (roughly: 'something audible happens here')."""
    audio = np.asarray(audio, np.float64)
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame)
    level = 20 * np.log10(np.sqrt((frames ** 2).mean(1)) + 1e-9)
    return float(level.mean()), float((level > -40).mean())


# ----------------------------------------------------------------------------- judge: a stand-in listener

# Nobody listens inside a test run or a CI log. As a measurable stand-in, a small
# digit classifier is trained on the *real* training recordings and then asked
# which digit each generated sample says. Its accuracy on the real test recordings
# says how far to trust it; its accuracy on the samples says whether the requested
# digit can be recognised at all. A judge is not a listener: it knows only the ten
# digits, and a sound no person would call speech can still fool it.

def log_spectrogram(audio, n_fft=256, hop=64):
    """Waveforms (B, T) -> log power (B, F, frames): F = n_fft / 2 + 1 = 129 bins of
    31 Hz, a frame every 8 ms, Hann window."""
    window = torch.hann_window(n_fft, device=audio.device)
    spec = torch.stft(audio, n_fft, hop, window=window, return_complex=True)
    return torch.log(spec.abs().pow(2) + 1e-8)


class DigitJudge(nn.Module):
    """Log spectrogram (B, F, frames) -> digit logits (B, 10).

    Each clip's spectrogram is standardised (loudness does not matter), then three
    1-D convolutions run over time with the F frequency bins as channels, and the
    max over time pools them: a word counts the same wherever it sits in the clip."""

    def __init__(self, n_freq=129, width=96):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(n_freq, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=4, dilation=2), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=8, dilation=4), nn.ReLU())
        self.out = nn.Linear(width, 10)

    def forward(self, spec):
        spec = (spec - spec.mean((1, 2), keepdim=True)) / (spec.std((1, 2), keepdim=True) + 1e-5)
        return self.out(self.net(spec).amax(-1))


def place_in_clip(audio, length, offset):
    """A recording (T,) float placed at `offset` in `length` samples of silence
    (cropped at `offset` instead when it is longer)."""
    clip = np.zeros(length, np.float32)
    if len(audio) >= length:
        return audio[offset:offset + length].astype(np.float32)
    clip[offset:offset + len(audio)] = audio
    return clip


def judge_batch(data, idx, length, rng):
    """One-second training clips: each recording at a random place, random loudness."""
    clips = []
    for i in idx:
        audio = mu_law_decode(torch.from_numpy(data[i][0].astype(np.int64))).numpy()
        offset = rng.integers(0, abs(length - len(audio)) + 1)
        clips.append(place_in_clip(audio, length, offset) * rng.uniform(0.3, 1.5))
    return torch.from_numpy(np.stack(clips)), torch.tensor([data[i][1] for i in idx])


def train_judge(data, steps, device, seed=0, batch_size=32, length=SAMPLE_RATE):
    """Fit a DigitJudge to the training recordings (Adam, cosine lr): a minute on a CPU."""
    torch.manual_seed(seed)
    judge = DigitJudge().to(device)
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    progress = Progress(steps, label="judge")
    judge.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, 2e-3, steps // 20)
        audio, digit = judge_batch(data, rng.integers(0, len(data), batch_size), length, rng)
        loss = F.cross_entropy(judge(log_spectrogram(audio.to(device))), digit.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step + 1, batch_size, loss=loss.item())
    return judge.eval()


@torch.no_grad()
def judge_digits(judge, audio, device):
    """Predicted digit of each waveform; audio is a list of float arrays (any lengths,
    each padded with silence to one second)."""
    length = max(SAMPLE_RATE, max(len(a) for a in audio))
    clips = torch.from_numpy(np.stack([place_in_clip(a, length, 0) for a in audio]))
    return judge(log_spectrogram(clips.to(device))).argmax(1).cpu()


# ----------------------------------------------------------------------------- outputs

def to_pcm(classes):
    """Classes (B, T) -> int16 PCM via the inverse mu-law."""
    audio = mu_law_decode(classes.cpu()).numpy()
    return np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)


def write_samples(model, speakers, test, args, device, out):
    """Generate --num-samples streams (digit i mod 10) in one batch, time the fast and
    the naive generator, write samples.npy and samples_digit{d}.wav."""
    n = int(round(args.gen_seconds * SAMPLE_RATE))
    digit = torch.arange(args.num_samples, device=device) % 10
    speaker = torch.full_like(digit, speakers.index(args.speaker) if args.speaker in speakers else 0)
    start = time.time()
    classes = generate(model, digit, speaker, n, args.temperature, args.seed)
    fast_seconds = time.time() - start
    pcm = to_pcm(classes)  # (N, T) int16
    atomic_write(out / "samples.npy", lambda f: np.save(f, pcm))
    gap = np.zeros(SAMPLE_RATE // 4, np.int16)  # a quarter second between samples of a digit
    for d in sorted(set(digit.tolist())):
        pieces = []
        for row in pcm[digit.cpu().numpy() == d]:
            pieces += [gap, row] if pieces else [row]
        write_wav(out / f"samples_digit{d}.wav", np.concatenate(pieces))
    # Naive recomputation is far too slow to run for a whole second: time it over
    # --naive-steps samples, starting from a full receptive field, and extrapolate.
    r = model.receptive_field()
    prefix = classes[:, :r] if n >= r else F.pad(classes, (r - n, 0), value=Q // 2)
    start = time.time()
    naive_generate(model, digit, speaker, args.naive_steps, args.temperature, args.seed, prefix)
    naive_rate = len(digit) * args.naive_steps / (time.time() - start)
    fast_rate = len(digit) * n / fast_seconds
    level, active = rms_dbfs(pcm.reshape(-1) / 32768.0)
    real = [rms_dbfs(mu_law_decode(torch.from_numpy(c.astype(np.int64))).numpy()) for c, _, _ in test]
    return {"gen_streams": len(digit), "gen_seconds_of_audio_each": n / SAMPLE_RATE,
            "gen_wall_seconds_fast": round(fast_seconds, 2),
            "gen_samples_per_second_fast": round(fast_rate, 1),
            "gen_samples_per_second_naive": round(naive_rate, 1),
            "gen_naive_timed_steps": args.naive_steps,
            "gen_wall_seconds_naive_extrapolated": round(len(digit) * n / naive_rate, 1),
            "gen_speedup_fast_over_naive": round(fast_rate / naive_rate, 1),
            "samples_rms_dbfs": round(level, 1), "samples_active_fraction": round(active, 3),
            "test_rms_dbfs": round(float(np.mean([a for a, _ in real])), 1),
            "test_active_fraction": round(float(np.mean([b for _, b in real])), 3)}, pcm, digit.cpu()


def spectrogram_picture(rows, db_range=80.0):
    """Rows of waveforms (lists of float arrays) -> one grey picture (H, W) uint8 of their
    log spectrograms, low frequencies at the bottom, the loudest bin white and
    everything db_range dB below it black; tiles separated by grey borders."""
    length = max(len(a) for row in rows for a in row)
    tiles = [log_spectrogram(torch.from_numpy(place_in_clip(a, length, 0))[None])[0].flip(0)
             for row in rows for a in row]                                 # (F, frames) each
    db = 10 / math.log(10) * torch.stack(tiles)                           # natural log -> dB
    img = ((db - db.max() + db_range) / db_range).clamp(0, 1)[:, None]   # (N, 1, F, frames)
    return image_grid(img.numpy(), ncol=max(len(row) for row in rows))


def judge_samples(train_set, test, pcm, digit, args, device, out):
    """Train the judge on real training recordings; score it on the real test recordings
    and on the samples; write spectrograms.png (per digit: a real test recording of
    the sampled voice, then that digit's samples)."""
    def waveform(classes):
        return mu_law_decode(torch.from_numpy(classes.astype(np.int64))).numpy()

    judge = train_judge(train_set, args.judge_steps, device, args.seed)
    truth = torch.tensor([d for _, d, _ in test])
    real_acc = (judge_digits(judge, [waveform(c) for c, _, _ in test], device) == truth).double().mean()
    heard = judge_digits(judge, list(pcm.astype(np.float32) / 32768.0), device)
    rows = []
    for d in sorted(set(digit.tolist())):
        real = ([c for c, dd, s in test if dd == d and s == args.speaker]
                or [c for c, dd, _ in test if dd == d])
        rows.append([waveform(real[0]) if real else np.zeros(SAMPLE_RATE, np.float32)]
                    + [a.astype(np.float32) / 32768.0 for a in pcm[(digit == d).numpy()]])
    write_png(out / "spectrograms.png", spectrogram_picture(rows))
    return {"judge_test_accuracy": round(real_acc.item(), 4),
            "judge_sample_accuracy": round((heard == digit).double().mean().item(), 4),
            "judge_sample_digits": heard.tolist()}


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["fsdd", "tones"], default="fsdd",
                   help="FSDD recordings, or synthetic tones (no download)")
    p.add_argument("--data-dir", default=str(HERE / "data" / "fsdd" / "recordings"),
                   help="folder with the FSDD recordings/*.wav (downloaded if empty or missing)")
    p.add_argument("--out", default=f"runs/{SCRIPT}", help="output folder")
    p.add_argument("--steps", type=int, default=2400, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="crops per step")
    p.add_argument("--crop", type=int, default=2000, help="samples per training crop")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--channels", type=int, default=64, help="residual channels C")
    p.add_argument("--skip-channels", type=int, default=128, help="skip channels S")
    p.add_argument("--cond-channels", type=int, default=16, help="conditioning embedding E")
    p.add_argument("--stacks", type=int, default=2, help="repeats of the dilation cycle")
    p.add_argument("--max-dilation", type=int, default=256,
                   help="dilations 1, 2, 4, ..., this (a power of 2) per stack")
    p.add_argument("--condition", choices=["none", "digit", "digit+speaker"],
                   default="digit+speaker", help="global conditioning h")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                   help="training autocast (evaluation and generation run in fp32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=10, help="generated streams, digit i mod 10")
    p.add_argument("--gen-seconds", type=float, default=1.0, help="length of each sample")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    p.add_argument("--speaker", default="jackson", help="voice for the samples (FSDD name)")
    p.add_argument("--judge-steps", type=int, default=800,
                   help="training steps of the digit classifier that judges the samples (0: no judge)")
    p.add_argument("--naive-steps", type=int, default=32,
                   help="samples over which naive generation is timed (then extrapolated)")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on the first N test recordings only (0: all)")
    p.add_argument("--save-every", type=int, default=500,
                   help="write model.pt and train_state.pt every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true",
                   help="go on from <out>/train_state.pt (same flags as the stopped run)")
    p.add_argument("--sample-only", action="store_true",
                   help="skip training: load --ckpt, evaluate and sample")
    p.add_argument("--ckpt", help="checkpoint to load with --sample-only")
    args = p.parse_args(argv)
    if args.sample_only and not args.ckpt:
        p.error("--sample-only needs --ckpt PATH")
    if args.sample_only and args.resume:
        p.error("--resume continues training; it does not go with --sample-only")
    if args.save_every < 0:
        p.error("--save-every must be >= 0")
    for flag in ("steps", "batch_size", "crop", "channels", "skip_channels", "cond_channels",
                 "stacks", "max_dilation", "num_samples", "naive_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_dilation & (args.max_dilation - 1):
        p.error("--max-dilation must be a power of 2")
    if args.test_limit < 0 or args.warmup < 0 or args.judge_steps < 0:
        p.error("--test-limit, --warmup and --judge-steps must be >= 0")
    if not (args.lr > 0 and args.temperature > 0 and args.gen_seconds > 0):
        p.error("--lr, --temperature and --gen-seconds must be positive")
    return args


def build_model(cfg, n_speakers):
    return WaveNet(cfg["channels"], cfg["skip_channels"], cfg["stacks"], cfg["max_dilation"],
                   n_digits=0 if cfg["condition"] == "none" else 10,
                   n_speakers=n_speakers if cfg["condition"] == "digit+speaker" else 0,
                   cond_channels=cfg["cond_channels"])


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, test = make_tones() if args.data == "tones" else load_fsdd(args.data_dir)
    test = test[:args.test_limit or None]
    if args.sample_only:
        ckpt = load_checkpoint(args.ckpt)
        cfg, speakers = ckpt["config"], ckpt["config"]["speakers"]
        model = build_model(cfg, len(speakers)).to(device)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise RunError(f"{args.ckpt}: weights do not fit the model its config describes") from None
        if {s for _, _, s in test} - set(speakers):
            raise RunError(f"{args.ckpt} was trained on other speakers ({', '.join(speakers)}); "
                           f"pass the --data it was trained on")
        steps, first_step, train_seconds = 0, 0, 0.0
    else:
        speakers = sorted({s for _, _, s in train_set})
        model = build_model(vars(args), len(speakers)).to(device)
        print(f"{len(train_set)} train / {len(test)} test recordings, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, receptive field "
              "%d samples (%.0f ms)" % receptive_field(model), flush=True)
        start = time.time()
        steps, first_step = train(model, train_set, speakers, args, device, out, args.resume)
        train_seconds = time.time() - start
        save_checkpoint(out / "model.pt", model.state_dict(), dict(vars(args), speakers=speakers))
    if args.speaker not in speakers:
        print(f"warning: --speaker {args.speaker} unknown; using {speakers[0]}", file=sys.stderr)
    start = time.time()
    bits, count = evaluate(model, test, speakers, device)
    metrics = {"test_nll_bits_per_sample": round(bits, 4), "test_recordings": len(test),
               "test_samples": count, "eval_seconds": round(time.time() - start, 1)}
    base0, base1 = markov_baselines(train_set, test)
    samples, ms = receptive_field(model)
    metrics.update(order0_bits_per_sample=round(base0, 4), order1_bits_per_sample=round(base1, 4),
                   receptive_field_samples=samples, receptive_field_ms=ms,
                   parameters=sum(p.numel() for p in model.parameters()))
    gen_metrics, pcm, digit = write_samples(model, speakers, test, args, device, out)
    metrics.update(gen_metrics)
    if args.judge_steps:
        metrics.update(judge_samples(train_set, test, pcm, digit, args, device, out))
    metrics.update(train_seconds=round(train_seconds, 1), steps=steps,
                   resumed_at_step=first_step, device=str(device),
                   data=args.data)
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
