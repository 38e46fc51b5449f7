"""A deterministic auto-encoder, and why its codes are no distribution to sample from.

An encoder z = f_E(x) squeezes an image into a code of Z numbers, a decoder x_hat = f_D(z)
brings it back; both learn by plain reconstruction,

    L = E_x | f_D(f_E(x)) - x |          (L1, the lecture's choice; --loss l2 for MSE)

Nothing in L says what the codes of unseen images look like, so the code space is no
distribution to sample from. The fair test: decode random codes z = m + L eps, eps ~ N(0, I),
from the Gaussian N(m, S = L L^T) of the training codes (their mean and full covariance). The
squared Mahalanobis distance d^2(z) = (z - m)^T S^-1 (z - m) is about Z for codes it describes.
Hinton & Salakhutdinov (2006). B batch, C channels, H W height, width (multiples of 4), Z code dims.

Run: python autoencoder.py [--data my_images.npy]; a smoke run: --steps 2 --test-limit 100
--num-samples 10. A default run (MNIST, about 2 minutes on 2 CPU cores) writes runs/autoencoder/
(model.pt, metrics.json, samples and recon .png/.npy, interp.png): test L1 0.022 per pixel, PSNR
22.6 dB; random codes lie as near N(m, S) as test codes (d^2 33 vs 31), decode to part-digits.
"""

import argparse
import gzip
import json
import math
import os
import random
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

SCRIPT = "autoencoder"


# ============================================================================ the method

class AutoEncoder(nn.Module):
    """Conv encoder (B, C, H, W) -> z (B, Z), its mirror image as decoder; model(x) = x_hat."""

    def __init__(self, z_dim=32, width=32, image_shape=(1, 28, 28)):
        super().__init__()
        (C, H, W), c1, c2 = image_shape, width, 2 * width    # H, W multiples of 4
        self.config = {"z_dim": z_dim, "width": width, "image_shape": [C, H, W]}  # rebuilds it
        self.encoder = nn.Sequential(
            nn.Conv2d(C, c1, 4, 2, 1), nn.ReLU(),               # (B, c1, H/2, W/2)
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),              # (B, c2, H/4, W/4)
            nn.Flatten(), nn.Linear(c2 * (H // 4) * (W // 4), z_dim),   # (B, Z)
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, c2 * (H // 4) * (W // 4)), nn.ReLU(),
            nn.Unflatten(1, (c2, H // 4, W // 4)),               # (B, c2, H/4, W/4)
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),      # (B, c1, H/2, W/2)
            nn.ConvTranspose2d(c1, C, 4, 2, 1),                  # (B, C, H, W)
        )
        # No sigmoid at the end: with L1, the gradient sign(x_hat - x) first pushes every pixel
        # towards the (black) median; a sigmoid then saturates and the gradient vanishes,
        # leaving an all-black decoder. A linear output keeps a unit gradient; outputs are
        # clamped to [0, 1] only when shown or scored. Buffers travel in model.pt: the Gaussian
        # N(m, L L^T) of the training codes, measured after training (code_gaussian).
        self.register_buffer("z_mean", torch.zeros(z_dim))   # m, (Z,)
        self.register_buffer("z_chol", torch.eye(z_dim))     # L, (Z, Z) lower triangular

    def forward(self, x):
        return self.decoder(self.encoder(x))

    @torch.no_grad()
    def decode(self, z):
        """Images (B, C, H, W) in [0, 1] from codes (B, Z), to look at."""
        return self.decoder(z).clamp(0, 1)


def reconstruction_loss(x_hat, x, kind="l1"):
    """Mean per-pixel |x_hat - x| (l1) or (x_hat - x)^2 (l2), x_hat = model(x)."""
    return (x_hat - x).abs().mean() if kind == "l1" else (x_hat - x).pow(2).mean()


def code_gaussian(z):
    """Mean m (Z,) and Cholesky factor L (Z, Z) of the covariance S = L L^T of codes z (N, Z)."""
    z = z.double()
    m = z.mean(0)
    S = (z - m).T @ (z - m) / (len(z) - 1)                    # (Z, Z), unbiased
    L, info = torch.linalg.cholesky_ex(S)
    if info:  # degenerate codes (fewer codes than dimensions, a constant dimension)
        L = torch.linalg.cholesky(S + (1e-6 * S.diagonal().mean() + 1e-12) * torch.eye(len(S)))
    return m.float(), L.float()


def random_codes(model, n, seed=0, diagonal=False):
    """n codes (n, Z) from the training codes' N(m, L L^T): z = m + L eps, eps ~ N(0, I), fixed
    noise so runs compare. diagonal=True keeps the variances S_ii only (correlations dropped)."""
    L = model.z_chol.cpu()
    if diagonal:
        L = torch.diag(L.norm(dim=1))                         # sqrt(S_ii) = |row i of L|
    eps = torch.randn(n, len(L), generator=torch.Generator().manual_seed(seed))  # (n, Z)
    return model.z_mean.cpu() + eps @ L.T                     # rows: z^T = m^T + eps^T L^T


def mahalanobis_sq(z, mean, chol):
    """d^2 = (z - m)^T S^-1 (z - m) = |L^-1 (z - m)|^2 for each code of z (N, Z).
    Its mean is Z for codes drawn from N(m, S) (a chi-square with Z degrees of freedom)."""
    diff = (z.cpu().double() - mean.cpu().double()).T         # (Z, N)
    w = torch.linalg.solve_triangular(chol.cpu().double(), diff, upper=False)  # L^-1 (z - m)
    return w.pow(2).sum(0)


def sample(model, n, seed=0, diagonal=False):
    """Decodes of random_codes: images (n, C, H, W) in [0, 1], on the CPU."""
    return model.decode(random_codes(model, n, seed, diagonal).to(model.z_mean.device)).cpu()


@torch.no_grad()
def interpolate(model, x_a, x_b, steps=10):
    """Decodes of (1 - t) z_a + t z_b for t in [0, 1]: (pairs * steps, C, H, W) on the CPU."""
    z_a, z_b = (model.encoder(x.to(model.z_mean.device)) for x in (x_a, x_b))   # (pairs, Z)
    t = torch.linspace(0, 1, steps, device=z_a.device).view(1, steps, 1)
    z = (1 - t) * z_a[:, None] + t * z_b[:, None]              # (pairs, steps, Z)
    return model.decode(z.flatten(0, 1)).cpu()


# ============================================================================ the experiment

def train(model, x_train, epochs, batch_size, lr, max_steps=0, loss="l1"):
    """Adam on the reconstruction loss for `epochs`, at most max_steps steps (0: no cap);
    x_train (N, C, H, W) on the CPU. Returns the number of steps taken and the seconds."""
    batch_size = min(batch_size, len(x_train))
    per_epoch = len(x_train) // batch_size
    total = min(epochs * per_epoch, max_steps or math.inf)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    progress, step = Progress(total), 0
    while step < total:  # an epoch: a fresh random order, the last partial batch dropped
        for idx in torch.randperm(len(x_train)).split(batch_size)[:min(per_epoch, total - step)]:
            x = x_train[idx].to(model.z_mean.device)
            value = reconstruction_loss(model(x), x, loss)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            step += 1
            progress(step, len(x), **{loss: value.detach()})
    return step, time.time() - progress.start  # the last progress line read the loss: GPU done


@torch.no_grad()
def encode(model, x):
    """Codes (N, Z) of images x (N, C, H, W), 1000 at a time on the model's device; on the CPU."""
    return torch.cat([model.encoder(b.to(model.z_mean.device)).cpu() for b in x.split(1000)])


def write_outputs(model, samples, x_test, recon, out):
    """samples.npy/.png, recon.npy; recon.png: rows of test images, each followed by its
    reconstruction; interp.png: lines from test codes 0-7 to codes 8-15."""
    for name, images in (("samples", samples), ("recon", recon)):   # (N, C, H, W) in [0, 1]
        atomic_write(out / f"{name}.npy", lambda f: np.save(f, images.numpy()))
    write_png(out / "samples.png", image_grid(samples, ncol=min(len(samples), 16)))
    ncol = min(16, len(x_test))
    n = min(4, len(x_test) // ncol) * ncol                      # up to 4 whole rows
    rows = torch.stack([x_test[:n], recon[:n]]).unflatten(1, (-1, ncol)).transpose(0, 1)
    write_png(out / "recon.png", image_grid(rows.flatten(0, 2), ncol=ncol))
    pairs = min(8, len(x_test) // 2)
    interp = interpolate(model, x_test[:pairs], x_test[pairs:2 * pairs])    # (pairs * 10, C, H, W)
    write_png(out / "interp.png", image_grid(interp, ncol=10))


# ============================================================================ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],   # a whole sentence
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--data", default="mnist", help="mnist, or images.npy: (N, [C,] H, W), H, W multiples of 4")
    add("--data-dir", default=str(Path(__file__).parent / "data" / "mnist"), help="MNIST's folder")
    add("--out", help="output folder (None: runs/autoencoder, or sample_only/ beside --ckpt)")
    add("--epochs", type=positive_int, default=10, help="passes over the training set")
    add("--steps", type=nonnegative_int, default=0, help="cap on optimizer steps (0: no cap)")
    add("--batch-size", type=positive_int, default=128, help="images per step")
    add("--lr", type=positive_float, default=2e-3, help="Adam's learning rate")
    add("--z-dim", type=positive_int, default=32, help="latent dimensions Z")
    add("--loss", choices=["l1", "l2"], default="l1", help="reconstruction loss")
    add("--codes", choices=["full", "diag"], default="full", help="diag: the Gaussian's correlations dropped")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    add("--seed", type=nonnegative_int, default=0, help="seeds training and the random codes")
    add("--num-samples", type=positive_int, default=64, help="random codes to decode")
    add("--test-limit", type=nonnegative_int, default=0, help="test images used (0: all)")
    add("--sample-only", action="store_true", help="no training: load --ckpt, evaluate, sample")
    add("--ckpt", help="model.pt to load with --sample-only")
    args = p.parse_args(argv)
    if args.sample_only != (args.ckpt is not None):
        p.error("--sample-only and --ckpt PATH go together")
    for name in ("z_dim", "epochs", "steps", "batch_size", "lr", "loss"):
        if args.sample_only and getattr(args, name) != p.get_default(name):
            p.error(f"--{name.replace('_', '-')} trains a model; --sample-only loads --ckpt's")
    return args


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out or (Path(args.ckpt).parent / "sample_only" if args.ckpt else f"runs/{SCRIPT}"))
    if args.sample_only and (out / "model.pt").exists():
        raise RunError(f"--out {out} holds a training run (model.pt); --sample-only writes elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    x_test = load_images(args.data, args.data_dir, "test")[0][:args.test_limit or None]
    shape = list(x_test.shape[1:])                              # [C, H, W]
    if args.sample_only:
        model, _ = load_checkpoint(args.ckpt, lambda cfg: AutoEncoder(cfg["z_dim"], cfg["width"], shape))
        model, steps, seconds = model.to(device), 0, 0.0
    else:
        if shape[1] % 4 or shape[2] % 4:  # two stride-2 layers halve H and W twice
            raise RunError(f"--data {args.data}: images {shape}, need H and W multiples of 4")
        x_train = load_images(args.data, args.data_dir, "train")[0]   # (N, C, H, W) in [0, 1]
        model = AutoEncoder(args.z_dim, image_shape=shape).to(device)
        steps, seconds = train(model, x_train, args.epochs, args.batch_size, args.lr, args.steps,
                               args.loss)
        x_fit = x_train[:args.steps * args.batch_size or None]   # --steps caps this stage too
        model.z_mean[:], model.z_chol[:] = code_gaussian(encode(model, x_fit))
        save_checkpoint(out / "model.pt", model.config, model.state_dict())
    z_test, diag = encode(model, x_test), args.codes == "diag"        # (N, Z)
    recon = torch.cat([model.decode(z.to(device)).cpu() for z in z_test.split(1000)])
    err = (recon - x_test).double()                                     # (N, C, H, W)
    mse = err.pow(2).mean().item()
    d2 = lambda z: mahalanobis_sq(z, model.z_mean, model.z_chol).mean().item()
    metrics = {"test_recon_l1": err.abs().mean().item(), "test_mse": mse,
               "test_psnr_db": 10 * math.log10(1 / mse),  # peak signal 1 over the MSE
               "sample_code_mahalanobis_sq": d2(random_codes(model, args.num_samples, args.seed, diag)),
               "test_code_mahalanobis_sq": d2(z_test), "test_images": len(x_test), "codes": args.codes,
               "train_seconds": round(seconds, 1), "steps": steps, "device": str(device)}
    write_outputs(model, sample(model, args.num_samples, args.seed, diag), x_test, recon[:500], out)
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return metrics


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
