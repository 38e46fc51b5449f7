"""The digit judge: how much do images look like MNIST digits? (FID and IS, for MNIST)

A small CNN trained on MNIST's 60,000 training digits (1,500 Adam steps of 128, seed 0, about
98.8 % test accuracy) stands in for Inception; its 128 penultimate features embed an image.
  FD    = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2) between Gaussians fitted to the
          features of a set and of the reference: 0 for identical sets, lower is better
  score = exp E_x KL(p(y|x) || p(y)): 1 (one class, or none confident) .. 10 (ten, confident)
The reference is fixed: MNIST's test digits 5,000..9,999 (scripts reconstruct the first 500).
FD falls as the number N of images grows, so each is printed beside anchors at the same N (the
first N test digits, the same binarised, uniform noise) and the noise floor at N: the FDs of
min(8, 60000 // N) disjoint sets of N real training digits. Within the floor is as good as real.

  python tools/digit_judge.py runs/vae/samples.npy [--labels L.npy] [--recon runs/vae/recon.npy]

Labels: the digits the samples were asked for (default: sample_labels.npy beside them, if any).
Trained on first use (minutes on a CPU), cached in --cache. Writes digit_judge.json beside them.
"""

import argparse
import gzip
import hashlib
import io
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, LR, SEED = 1500, 128, 1e-3, 0
REFERENCE = slice(5000, 10000)  # of MNIST's test digits; the first 5,000 give anchors and recons


class JudgeError(Exception):
    """Bad input or missing data: main() prints it as one line and exits with status 1."""


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


def train_judge(images, labels, steps, device):
    """Cross-entropy, Adam, batches drawn with replacement, seed 0; images (N, 28, 28) in [0, 1]."""
    torch.manual_seed(SEED)
    judge = DigitJudge().to(device)
    opt = torch.optim.Adam(judge.parameters(), lr=LR)
    gen, labels = torch.Generator().manual_seed(SEED), torch.as_tensor(labels)
    for step in range(1, steps + 1):
        idx = torch.randint(len(images), (min(BATCH, len(images)),), generator=gen)
        x = torch.from_numpy(images[idx.numpy(), None]).to(device)  # (B, 1, 28, 28)
        loss = F.cross_entropy(judge(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            print(f"digit judge {step}/{steps} | loss {loss.item():.3f}", flush=True)
    return judge.eval()


@torch.no_grad()
def judge_outputs(judge, images, batch_size=500):
    """Features (N, 128) and class probabilities (N, 10), float64 numpy."""
    device = next(judge.parameters()).device
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = judge.features(torch.as_tensor(images[i:i + batch_size, None], device=device))
        feats.append(f.double().cpu())
        probs.append(torch.softmax(judge.head(f).double(), 1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def frechet_distance(feats_a, feats_b):
    """FD of Gaussians fitted to feature sets (N, F). tr (C_a C_b)^1/2 = the sum of the square
    roots of C_a C_b's eigenvalues, those of the similar, symmetric PSD C_a^1/2 C_b C_a^1/2."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) \
        - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(fd, 0.0))


def judge_score(probs):
    """exp E_x KL(p(y|x) || p(y)), the mean inside the exp (the Inception score's form)."""
    p_y = probs.mean(0, keepdims=True)
    kl = (probs * (np.log(probs + 1e-12) - np.log(p_y + 1e-12))).sum(1)
    return float(np.exp(kl.mean()))


def noise_floor(embed, train_images, n, ref, max_sets=8):
    """FDs of min(max_sets, len // n) disjoint sets of n training digits (one fixed shuffle)."""
    order = np.random.default_rng(SEED).permutation(len(train_images))
    sets = [np.sort(order[i * n:(i + 1) * n]) for i in range(min(max_sets, len(order) // n))]
    return [frechet_distance(embed(train_images[s])[0], ref) for s in sets]


def figures(embed, train_images, test_images, samples, labels=None, recon=None, max_sets=8):
    """Every figure, each FD against the one reference. embed: images -> (features, probs)."""
    ref, _ = embed(test_images[REFERENCE])
    real = test_images[:min(len(samples), REFERENCE.start)]
    rng = np.random.default_rng(SEED)
    sets = {"sample": samples, "recon": recon, "anchor_real": real,
            "anchor_binarised": (rng.random(real.shape) < real).astype(np.float32),
            "anchor_noise": rng.random(real.shape, dtype=np.float32)}
    out = {"reference": "MNIST test digits 5000..9999"}
    for key, images in sets.items():
        if images is None:
            continue
        feats, probs = embed(images)
        out.update({f"{key}_n": len(images), f"{key}_fd": frechet_distance(feats, ref)})
        if key != "recon":  # a recon's classes are the test digits', no news
            out[f"{key}_score"] = judge_score(probs)
        if key == "sample" and labels is not None:
            out["sample_label_match"] = float((probs.argmax(1) == labels).mean())
    sizes = sorted({v for k, v in out.items() if k.endswith("_n")})
    out["noise_floor_fd"] = {str(n): noise_floor(embed, train_images, n, ref, max_sets)
                             for n in sizes}
    return out


def load_mnist(data_dir, split):
    """(images (N, 28, 28) float32 in [0, 1], labels (N,) int64) of split 'train' or 't10k',
    from gzipped idx files: 0 0 8 ndim, ndim big-endian int32 sizes, then the uint8 data."""
    paths = [Path(data_dir) / f"{split}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    try:
        images, labels = (gzip.decompress(path.read_bytes()) for path in paths)
    except (OSError, EOFError, zlib.error) as e:
        raise JudgeError(f"MNIST: {e} (shipped in data/mnist/; see --data-dir)") from None
    n = int.from_bytes(labels[4:8], "big")
    if (images[:16] != b"\0\0\x08\x03" + np.array([n, 28, 28], ">u4").tobytes() or len(images) != 16
            + 784 * n or labels[:4] != b"\0\0\x08\x01" or len(labels) != 8 + n):
        raise JudgeError(f"{paths[0]}, {paths[1]}: bad idx headers or sizes; the files are damaged")
    return (np.frombuffer(images, np.uint8, offset=16).reshape(n, 28, 28) / np.float32(255),
            np.frombuffer(labels, np.uint8, offset=8).astype(np.int64))


def load_or_train(path, train, test, steps, device):
    """(judge, test accuracy), from path if the json beside it holds this config and its sha256."""
    path, meta_path = Path(path), Path(path).with_suffix(".json")
    data = hashlib.sha256(train[0].tobytes() + train[1].tobytes()).hexdigest()[:16]
    config = {"steps": steps, "batch": BATCH, "lr": LR, "seed": SEED, "data": data, "version": 3}
    try:
        meta, blob = json.loads(meta_path.read_text()), path.read_bytes()
        if meta["config"] == config and meta["sha256"] == hashlib.sha256(blob).hexdigest():
            judge = DigitJudge()
            judge.load_state_dict(torch.load(io.BytesIO(blob), "cpu", weights_only=True))
            return judge.to(device).eval(), float(meta["test_accuracy"])
    except Exception:  # missing, unreadable or damaged (torch.load raises many kinds): retrain
        pass
    print(f"training the digit judge ({steps} steps of {BATCH}) -> {path}", flush=True)
    judge = train_judge(train[0], train[1], steps, device)
    accuracy = float((judge_outputs(judge, test[0])[1].argmax(1) == test[1]).mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(judge.state_dict(), path)  # then the json: a crash between fails the sha256 check
    meta_path.write_text(json.dumps({"config": config, "test_accuracy": accuracy, "sha256":
                                     hashlib.sha256(path.read_bytes()).hexdigest()}, indent=2))
    return judge, accuracy


def read_npy(path, what):
    try:
        return np.load(path)  # allow_pickle=False: a plain array, never code
    except (OSError, ValueError, EOFError) as e:
        raise JudgeError(f"{what} {path}: not a readable .npy array ({e})") from None


def read_images(path, what="samples"):
    """(N, 28, 28) float32 in [0, 1] from (N, 1, 28, 28) or (N, 28, 28), uint8 or [0, 1]."""
    x = read_npy(path, what)
    if not (x.shape[1:] in ((1, 28, 28), (28, 28)) and x.shape[0] >= 2 and (x.dtype == np.uint8 or (
            x.dtype.kind == "f" and np.isfinite(x).all() and 0 <= x.min() <= x.max() <= 1))):
        raise JudgeError(f"{what} {path}: {x.dtype} array of shape {x.shape}; expected "
                         "(N, 1, 28, 28) or (N, 28, 28), N >= 2, uint8 or floats in [0, 1]")
    x = x.reshape(len(x), 28, 28)
    return x / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32)


def print_table(r):
    print(f"digit judge: {r['judge_test_accuracy']:.2%} of MNIST's test digits right; FD against "
          f"{r['reference']}\n{'images':<19}    N       FD  noise floor at N   score  label match")
    for key in ("sample", "recon", "anchor_real", "anchor_binarised", "anchor_noise"):
        if key + "_n" in r:
            n, f, score, match = (r[key + "_n"], r["noise_floor_fd"][str(r[key + "_n"])],
                                  r.get(key + "_score"), r.get(key + "_label_match"))
            floor = f"{min(f):6.1f} .. {max(f):<6.1f}" if f else ""
            name = key[7:] + " (anchor)" if key.startswith("anchor") else key
            print(f"{name:<19}{n:>5}{r[key + '_fd']:>9.1f}  {floor:<16}"
                  + (f"{score:8.2f}" if score else "") + (f"{match:11.1%}" if match else ""))


def run(args):
    if args.steps < 1 or args.device == "cuda" and not torch.cuda.is_available():
        raise JudgeError("--steps must be > 0" if args.steps < 1 else "--device cuda: no CUDA")
    samples = read_images(args.samples)
    labels = args.labels or Path(args.samples).with_name("sample_labels.npy")
    labels = read_npy(labels, "labels") if args.labels or labels.is_file() else None
    if labels is not None and not (labels.shape == (len(samples),) and labels.dtype.kind in "iu"
                                   and 0 <= labels.min() <= labels.max() <= 9):
        raise JudgeError(f"labels {labels.dtype} {labels.shape}: not {len(samples)} digits 0..9")
    recon = read_images(args.recon, "recon") if args.recon else None
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    train, test = load_mnist(args.data_dir, "train"), load_mnist(args.data_dir, "t10k")
    name = "digit_judge" + ("" if args.steps == STEPS else f"_{args.steps}steps") + ".pt"
    judge, accuracy = load_or_train(Path(args.cache) / name, train, test, args.steps, device)
    report = {"judge_test_accuracy": accuracy, "judge_steps": args.steps, **figures(
        lambda images: judge_outputs(judge, images), train[0], test[0], samples, labels, recon)}
    print_table(report)
    out = Path(args.json or Path(args.samples).with_name("digit_judge.json"))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("samples", help="samples.npy: (N, 1, 28, 28) or (N, 28, 28), [0, 1] or uint8")
    p.add_argument("--labels", help="(N,) asked digits; None: sample_labels.npy beside, if any")
    p.add_argument("--recon", help="recon.npy: reconstructions of the first n test digits")
    p.add_argument("--json", help="output; None: digit_judge.json beside the samples")
    p.add_argument("--data-dir", default=str(ROOT / "data" / "mnist"), help="MNIST's .gz files")
    p.add_argument("--cache", default=str(ROOT / "runs" / "tools"), help="the judge's folder")
    p.add_argument("--steps", type=int, default=STEPS, help="the judge's steps (fewer: for tests)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    try:
        return run(p.parse_args(argv))
    except (JudgeError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
