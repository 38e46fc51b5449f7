"""The speech judge: is a generated clip heard as the digit it was asked for? (for wavenet.py)

Nobody listens inside a test run or a CI log. As a stand-in, a small classifier of spoken digits
is trained on the real FSDD training recordings ({digit}_{speaker}_{index}.wav, index 5-49) and
asked which digit each generated clip says. Its accuracy on the real test recordings (index
0-4) says how far to trust it; on the samples, whether the asked digit can be recognised at
all. A judge is not a listener: it knows only ten digits, and a sound no person would call
speech can still fool it.

The classifier: a log spectrogram (Hann window of 256, hop 64 at 8 kHz: 129 bins of 31 Hz, a
frame every 8 ms), standardised per clip; three dilated 1-D convolutions over time with the
bins as channels; the max over time (a word counts the same wherever it sits); 10 logits.
Every clip first passes the 8-bit mu-law channel WaveNet generates in, so real and generated
clips differ in what they say, not in their quantisation noise.

  python tools/speech_judge.py runs/wavenet [--data-dir data/fsdd/recordings]

Scores every *digit{d}*.wav in the folder (wavenet.py writes samples_digit{d}.wav: that digit's
samples, a quarter second of digital silence apart, where they are split again). Trained on
first use (about a minute on a CPU), cached in --cache. Prints a table, writes speech_judge.json.
"""

import argparse
import hashlib
import io
import json
import math
import re
import sys
import wave
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RATE = 8000
STEPS, BATCH, LR, SEED = 800, 32, 2e-3, 0
CLIP = SAMPLE_RATE  # training clips: one second, each recording at a random place in it
GAP = SAMPLE_RATE // 5  # a run of this many exact zeros separates two samples in one file
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")  # digit, speaker, index


class JudgeError(Exception):
    """Bad input or missing data: main() prints it as one line and exits with status 1."""


def mu_law_channel(audio, mu=255):
    """Waveform in [-1, 1] -> y = sign(x) ln(1 + mu|x|) / ln(1 + mu), rounded to one of 256
    levels, -> back: x = sign(y) ((1 + mu)^|y| - 1) / mu. What WaveNet's samples went through."""
    x = torch.as_tensor(audio, dtype=torch.float32).clamp(-1.0, 1.0)
    y = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    y = 2 * torch.floor((y + 1) / 2 * mu + 0.5) / mu - 1
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu


def log_spectrogram(audio, n_fft=256, hop=64):
    """Waveforms (B, T) -> log power (B, F, frames), F = n_fft / 2 + 1 = 129."""
    window = torch.hann_window(n_fft, device=audio.device)
    spec = torch.stft(audio, n_fft, hop, window=window, return_complex=True)
    return torch.log(spec.abs().pow(2) + 1e-8)


class SpeechJudge(nn.Module):
    """Log spectrogram (B, F, frames) -> digit logits (B, 10)."""

    def __init__(self, n_freq=129, width=96):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(n_freq, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=4, dilation=2), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=8, dilation=4), nn.ReLU())
        self.out = nn.Linear(width, 10)

    def forward(self, spec):  # standardised per clip: loudness does not matter
        spec = (spec - spec.mean((1, 2), keepdim=True)) / (spec.std((1, 2), keepdim=True) + 1e-5)
        return self.out(self.net(spec).amax(-1))


def place_in_clip(audio, length, offset):
    """audio (T,) at offset in `length` samples of silence (cropped at offset when longer)."""
    if len(audio) >= length:
        return audio[offset:offset + length]
    clip = np.zeros(length, np.float32)
    clip[offset:offset + len(audio)] = audio
    return clip


def train_judge(recordings, steps, device):
    """Cross-entropy on CLIP-long clips (each recording at a random place, random loudness),
    Adam with a linear warm-up then cosine decay of the learning rate, all from seed 0."""
    torch.manual_seed(SEED)
    judge = SpeechJudge().to(device)
    opt = torch.optim.Adam(judge.parameters(), lr=LR)
    rng, warmup = np.random.default_rng(SEED), steps // 20
    for step in range(steps):
        decay = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
        for group in opt.param_groups:
            group["lr"] = LR * ((step + 1) / warmup if step < warmup else decay)
        idx = rng.integers(0, len(recordings), BATCH)
        clips = np.stack([place_in_clip(a, CLIP, rng.integers(0, abs(CLIP - len(a)) + 1))
                          * rng.uniform(0.3, 1.5) for a, _ in (recordings[i] for i in idx)])
        digits = torch.tensor([recordings[i][1] for i in idx], device=device)
        loss = F.cross_entropy(judge(log_spectrogram(torch.from_numpy(clips).to(device))), digits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"speech judge {step + 1}/{steps} | loss {loss.item():.3f}", flush=True)
    return judge.eval()


@torch.no_grad()
def judge_digits(judge, clips):
    """The digit heard in each clip (float32 (T,)), one at a time: a clip shorter than CLIP is
    padded with silence to CLIP, as in training; a longer one is heard whole."""
    device = next(judge.parameters()).device
    return [int(judge(log_spectrogram(torch.from_numpy(place_in_clip(a, max(CLIP, len(a)), 0))
                                      [None].to(device))).argmax()) for a in clips]


def read_wav(path):
    """A mono 16-bit 8 kHz wav file -> int16 (T,)."""
    try:
        with wave.open(str(path), "rb") as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, SAMPLE_RATE):
                raise JudgeError(f"{path}: expected mono 16-bit {SAMPLE_RATE} Hz audio")
            return np.frombuffer(w.readframes(w.getnframes()), "<i2")
    except (wave.Error, EOFError, OSError) as e:
        raise JudgeError(f"{path}: not a readable wav file ({e})") from None


def to_float(pcm):  # int16 -> float32 in [-1, 1) through the mu-law channel
    return mu_law_channel(pcm.astype(np.float32) / 32768.0).numpy()


def load_fsdd(data_dir):
    """(train, test, sha256 of the files): lists of (waveform (T,) float32, digit); test is
    index 0-4 of each speaker and digit (the dataset's split), train the rest."""
    files = sorted(p for p in Path(data_dir).glob("*.wav") if FSDD_NAME.match(p.name))
    train, test, digest = [], [], hashlib.sha256()
    for path in files:
        digit, _, index = FSDD_NAME.match(path.name).groups()
        pcm = read_wav(path)
        digest.update(path.name.encode() + pcm.tobytes())
        (test if int(index) < 5 else train).append((to_float(pcm), int(digit)))
    if not train or not test:
        raise JudgeError(f"--data-dir {data_dir}: need FSDD recordings {{digit}}_{{speaker}}_"
                         "{index}.wav with index 0-4 (test) and 5-49 (train)")
    return train, test, digest.hexdigest()[:16]


def load_or_train(path, train, test, data_hash, steps, device):
    """(judge, test accuracy), from path if the json beside it holds this config and its sha256."""
    path, meta_path = Path(path), Path(path).with_suffix(".json")
    config = {"steps": steps, "batch": BATCH, "clip": CLIP, "lr": LR, "seed": SEED,
              "data": data_hash, "version": 1}
    try:
        meta, blob = json.loads(meta_path.read_text()), path.read_bytes()
        if meta["config"] == config and meta["sha256"] == hashlib.sha256(blob).hexdigest():
            judge = SpeechJudge()
            judge.load_state_dict(torch.load(io.BytesIO(blob), "cpu", weights_only=True))
            return judge.to(device).eval(), float(meta["test_accuracy"])
    except Exception:  # missing, unreadable or damaged (torch.load raises many kinds): retrain
        pass
    print(f"training the speech judge ({steps} steps of {BATCH}) -> {path}", flush=True)
    judge = train_judge(train, steps, device)
    heard = judge_digits(judge, [a for a, _ in test])
    accuracy = float(np.mean([h == d for h, (_, d) in zip(heard, test)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(judge.state_dict(), path)  # then the json: a crash between fails the sha256 check
    meta_path.write_text(json.dumps({"config": config, "test_accuracy": accuracy, "sha256":
                                     hashlib.sha256(path.read_bytes()).hexdigest()}, indent=2))
    return judge, accuracy


def asked_digit(name):
    """The digit in a file name like samples_digit3.wav (None if there is none)."""
    m = re.search(r"digit(\d)(?!\d)", name)
    return int(m[1]) if m else None


def split_samples(pcm, gap=GAP):
    """The samples in one file: the pieces between runs of at least `gap` exact zeros (a
    mu-law sample is never exactly 0, so only the silence written between samples is)."""
    zero = np.concatenate([[False], pcm == 0, [False]])
    edges = np.flatnonzero(zero[1:] != zero[:-1]).reshape(-1, 2)  # [start, end) of zero runs
    cuts = [0] + [i for s, e in edges if e - s >= gap for i in (s, e)] + [len(pcm)]
    return [pcm[a:b] for a, b in zip(cuts[::2], cuts[1::2]) if b > a]


def run(args):
    folder = Path(args.folder)
    files = sorted(p for p in folder.glob("*.wav") if asked_digit(p.name) is not None)
    if not files:
        raise JudgeError(f"{folder}: no wav files named like *digit{{d}}*.wav to score")
    samples = {p.name: (asked_digit(p.name), split_samples(read_wav(p))) for p in files}
    if args.steps < 1 or args.device == "cuda" and not torch.cuda.is_available():
        raise JudgeError("--steps must be > 0" if args.steps < 1 else "--device cuda: no CUDA")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    train, test, data_hash = load_fsdd(args.data_dir)
    name = "speech_judge" + ("" if args.steps == STEPS else f"_{args.steps}steps") + ".pt"
    judge, accuracy = load_or_train(Path(args.cache) / name, train, test, data_hash, args.steps,
                                    device)
    print(f"speech judge: {accuracy:.1%} of the {len(test)} real test recordings heard right\n"
          f"{'file':<28}{'asked':>6}  heard as")
    report = {"judge_test_accuracy": accuracy, "judge_steps": args.steps, "files": {}}
    for name, (digit, pieces) in samples.items():
        heard = judge_digits(judge, [to_float(p) for p in pieces]) if pieces else []
        report["files"][name] = {"asked": digit, "heard": heard}
        print(f"{name:<28}{digit:>6}  {' '.join(map(str, heard))}")
    heard = [(f["asked"], h) for f in report["files"].values() for h in f["heard"]]
    right = sum(a == h for a, h in heard)
    report.update(sample_n=len(heard), sample_right=right,
                  sample_accuracy=right / len(heard) if heard else None)
    print(f"{right} of {len(heard)} samples heard as the digit in their file's name")
    out = Path(args.json or folder / "speech_judge.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="a folder of *digit{d}*.wav files (wavenet.py's --out)")
    p.add_argument("--data-dir", default=str(ROOT / "data" / "fsdd" / "recordings"),
                   help="the FSDD recordings, {digit}_{speaker}_{index}.wav")
    p.add_argument("--json", help="output; None: speech_judge.json in the folder")
    p.add_argument("--cache", default=str(ROOT / "runs" / "tools"), help="the judge's folder")
    p.add_argument("--steps", type=int, default=STEPS, help="the judge's steps (fewer: for tests)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    try:
        return run(p.parse_args(argv))
    except (JudgeError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
