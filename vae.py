"""Variational auto-encoder (VAE) on binarised MNIST, with an honest likelihood.

The auto-encoder of autoencoder.py made probabilistic. A prior P(z) = N(0, I), a
decoder P_D(x|z) (one Bernoulli per pixel, given by its logit) and an encoder
Q(z|x) = N(mu(x), diag(exp(logvar(x)))) that stands in for the intractable true
posterior P(z|x). Training maximises the evidence lower bound, per image in nats,

    log P(x) >= ELBO = E_{z~Q(z|x)}[log P_D(x|z)] - KL(Q(z|x) || P(z))

and we minimise -ELBO = recon + kl, with recon = -log P_D(x|z) summed over the 784
pixels and kl in closed form. The expectation is estimated with one sample drawn
by the reparametrisation trick, z = mu + sigma * eps, eps ~ N(0, I), so gradients
flow through the sample into mu and logvar (Kingma & Welling, 2014).

Because the ELBO is only a bound, the test likelihood is reported with the
importance-weighted estimate of Burda, Grosse & Salakhutdinov (2016),

    log P(x) ~= logsumexp_k [log P_D(x|z_k) + log P(z_k) - log Q(z_k|x)] - log k,

z_k ~ Q(z|x), which tightens as k grows (k = 100 by default, --iw-samples 5000 is
the paper's). That `test_nll_nats` is the number comparable to papers: 86.76 nats
for the one-stochastic-layer VAE of Burda et al. (Table 1).

Setting: MNIST *dynamically binarised* for training (every pixel ~ Bernoulli of
its intensity, redrawn each time an image is used: a free regulariser); the test
set binarised once with a fixed seed, so test numbers compare between runs.
(--likelihood gaussian trains on the grey levels with a fixed-sigma Gaussian
decoder instead; its nats are densities, not comparable to the Bernoulli ones.)

Why this architecture: MLPs, 784-512-512 -> (mu, logvar) and 32-512-512 -> 784,
with SiLU. On a 2-core CPU dense matrix products are the cheapest FLOPs there are,
and the evaluation runs the decoder k = 100 times per test image, so a small
dense decoder keeps both training and the importance-weighted evaluation fast.
The rest is the training recipe, chosen to use the minutes well: batch 256
(better CPU throughput than 128) at twice the usual step size, 2e-3, with a
cosine decay to zero: large steps early, a careful descent at the end. After 20
epochs the decay alone is worth 2.2 nats of -ELBO and 0.5 nats of test_nll_nats
(first 2000 test images) over a constant 2e-3. The decoder's output bias starts
at the logit of the mean training image, so the first steps learn strokes, not
the background. SiLU rather than ReLU: smooth, and as fast here (not ablated).

Its known weaknesses show in the outputs: samples are blurry (the decoder's mean
averages over what the Gaussian posterior cannot tell apart), and Q is a diagonal
Gaussian however complicated the true posterior is. Its strength shows in
interp.png: the KL term packs codes into the prior's ball, so the midpoints of a
latent line decode to digits, not to the autoencoder's ghostly overlays.

Shape legend: B batch, C channels, H W height width, D = 784 pixels, Z latent
dims, K importance samples.

Run:   python vae.py                                   (3.5 minutes on a 2-core CPU)
       python vae.py --z-dim 2                          (adds manifold.png)
       python vae.py --sample-only --ckpt runs/vae/model.pt --iw-samples 1000
       python vae.py --epochs 500 --iw-samples 5000 --out runs/vae_long
                      (a longer run in the paper's setting; not run here: about
                      21 min of training and 6 min of k = 5000 evaluation on
                      this CPU, extrapolated from the default run's speed)
Writes runs/vae/: samples.png, samples.npy, recon.png, interp.png, model.pt,
metrics.json (test_neg_elbo_nats, test_recon_nats, test_kl_nats, test_nll_nats,
test_bits_per_dim, iw_samples, ...). A default run (80 epochs, 194 s of training,
8 s of evaluation) reaches test_nll_nats 87.24 with k = 100 (-ELBO 89.91); its
model evaluated with --iw-samples 1000 gives 86.91 (72 s) and with
--iw-samples 5000 gives 86.79 on the whole test set (5.4 min), beside the paper's
86.76 (k = 5000).

References: Kingma & Welling, "Auto-Encoding Variational Bayes" (2014); Burda,
Grosse & Salakhutdinov, "Importance Weighted Autoencoders" (2016).
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

SCRIPT = "vae"
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

D = 28 * 28                # pixels per image
TEST_BINARIZATION_SEED = 1234  # the test set is binarised once, the same for every run
LOG_2PI = math.log(2 * math.pi)


def mnist_tensors(data_dir, split):
    """Images as float (N, 1, 28, 28) in [0, 1], and labels (N,)."""
    images, labels = load_mnist(data_dir, split)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels)


def binarize(x, generator=None):
    """Each pixel becomes 1 with probability equal to its intensity, else 0."""
    return torch.bernoulli(x, generator=generator)


def fixed_test_set(x_test, likelihood):
    """The test images the metrics are computed on, (N, D): binarised once with a fixed
    seed (on the CPU, so every device sees the same bits), or grey levels for Gaussian."""
    if likelihood == "gaussian":
        return x_test.flatten(1)
    return binarize(x_test.flatten(1), torch.Generator().manual_seed(TEST_BINARIZATION_SEED))


# ----------------------------------------------------------------------------- model

class VAE(nn.Module):
    """Encoder x -> (mu, logvar) of Q(z|x); decoder z -> the logits of P_D(x|z).

    Both are two-hidden-layer MLPs (see the docstring for why). With the Gaussian
    likelihood the decoder's mean is sigmoid(logits) and sigma is fixed."""

    def __init__(self, z_dim=32, hidden=512, likelihood="bernoulli", sigma=0.1):
        super().__init__()
        self.z_dim, self.likelihood, self.sigma = z_dim, likelihood, sigma
        self.encoder = nn.Sequential(
            nn.Linear(D, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2 * z_dim),                      # (B, 2Z): mu and logvar
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, D),                              # (..., D) logits
        )

    @torch.no_grad()
    def init_output_bias(self, mean_image):
        """Start the decoder at 'every pixel is on with its average frequency': the
        first steps then learn digits instead of the background."""
        p = mean_image.flatten().clamp(1e-3, 1 - 1e-3)
        self.decoder[-1].bias.copy_(torch.log(p) - torch.log1p(-p))  # logit(p)

    def encode(self, x):
        """x (B, D) -> mu (B, Z), logvar (B, Z) of Q(z|x)."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        """z (..., Z) -> logits (..., D) of P_D(x|z)."""
        return self.decoder(z)

    def log_px(self, logits, x):
        """log P_D(x|z) in nats, summed over the D pixels: (...,)."""
        if self.likelihood == "gaussian":
            return gaussian_log_likelihood(torch.sigmoid(logits), x, self.sigma)
        return bernoulli_log_likelihood(logits, x)


# ----------------------------------------------------------------------------- objective

def gaussian_kl(mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) in closed form, per example: (B,)."""
    # KL = -0.5 * sum(1 + logvar - mu^2 - exp(logvar))
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def bernoulli_log_likelihood(logits, x):
    """log P(x) = sum_d [x_d log p_d + (1 - x_d) log(1 - p_d)], p = sigmoid(logits): (...,)."""
    # With p = sigmoid(l): log p = l - softplus(l) and log(1 - p) = -softplus(l), so
    # log P(x) = sum(x * l - softplus(l)), which stays finite for any logit.
    return (x * logits - F.softplus(logits)).sum(-1)


def gaussian_log_likelihood(mean, x, sigma):
    """log N(x; mean, sigma^2 I) summed over pixels: a density, for --likelihood gaussian."""
    # log N = sum(-0.5 * ((x - mean) / sigma)^2 - log sigma - 0.5 * log 2pi)
    return (-0.5 * ((x - mean) / sigma).pow(2) - math.log(sigma) - 0.5 * LOG_2PI).sum(-1)


def log_normal(z, mu, logvar):
    """log N(z; mu, diag(exp(logvar))), summed over the Z dims: (...,)."""
    # log N = -0.5 * sum(log 2pi + logvar + (z - mu)^2 / exp(logvar))
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def reparametrize(mu, logvar, eps=None):
    """A sample of Q(z|x) that is a differentiable function of mu and logvar."""
    if eps is None:
        eps = torch.randn_like(mu)
    # z = mu + sigma * eps, sigma = exp(0.5 * logvar)
    return mu + torch.exp(0.5 * logvar) * eps


def elbo_terms(model, x):
    """The two terms of -ELBO per image, in nats, each (B,), for x (B, D):
    recon = -log P_D(x|z) with one z ~ Q(z|x), and kl = KL(Q(z|x) || P(z))."""
    mu, logvar = model.encode(x)
    z = reparametrize(mu, logvar)                                # (B, Z)
    recon = -model.log_px(model.decode(z), x)
    kl = gaussian_kl(mu, logvar)
    return recon, kl


def iwae_log_likelihood(model, x, k, chunk=100):
    """Importance-weighted estimate of log P(x) with k samples, per image: (B,).

    log P(x) ~= logsumexp_k [log P_D(x|z_k) + log P(z_k) - log Q(z_k|x)] - log k,
    a lower bound in expectation that rises towards log P(x) as k grows (Burda et
    al. 2016); k = 1 is the ELBO with a sampled KL. The decoder sees `chunk`
    samples at a time, so k = 5000 needs no more memory than k = 100."""
    mu, logvar = model.encode(x)                                 # (B, Z)
    log_w = []
    for start in range(0, k, chunk):
        eps = torch.randn(min(chunk, k - start), *mu.shape, device=mu.device)
        z = reparametrize(mu, logvar, eps)                       # (K', B, Z)
        log_prior = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        log_w.append(model.log_px(model.decode(z), x) + log_prior - log_normal(z, mu, logvar))
    log_w = torch.cat(log_w)                                     # (K, B)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


# ----------------------------------------------------------------------------- train / evaluate / sample

def cosine_lr(step, total):
    """Learning-rate factor: 0.5 * (1 + cos(pi * step / total)), from 1 down to 0."""
    return 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def train(model, x_train, args, device):
    """Adam on -ELBO, by default with a cosine learning-rate decay; x_train (N, D) on `device`,
    re-binarised for every batch when the likelihood is Bernoulli."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    batch = min(args.batch_size, len(x_train))
    steps_per_epoch = len(x_train) // batch
    total = args.epochs * steps_per_epoch
    if args.steps:
        total = min(total, args.steps)
    factor = (lambda s: cosine_lr(s, total)) if args.schedule == "cosine" else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    progress = Progress(total)
    step = 0
    while step < total:
        model.train()
        order = torch.randperm(len(x_train), device=device)
        for i in range(steps_per_epoch):
            if step == total:
                break
            xb = x_train[order[i * batch:(i + 1) * batch]]      # (B, D)
            if model.likelihood == "bernoulli":
                xb = binarize(xb)                                # fresh bits every time
            recon, kl = elbo_terms(model, xb)
            loss = (recon + kl).mean()                           # -ELBO, nats per image
            check_finite(step, loss=loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            progress.update(step, len(xb), neg_elbo=loss.item(), recon=recon.mean().item(),
                            kl=kl.mean().item(), lr=sched.get_last_lr()[0])
    return step


@torch.no_grad()
def evaluate(model, x, device, k, batch_size=100):
    """Test metrics, nats per image, on x (N, D): -ELBO and its two terms (one sample of
    z per image), the k-sample importance-weighted -log P(x), and it in bits per pixel."""
    model.eval()
    recon_sum = kl_sum = nll_sum = 0.0
    progress = Progress(len(x), label="eval")
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        recon, kl = elbo_terms(model, xb)
        nll = -iwae_log_likelihood(model, xb, k)
        recon_sum, kl_sum, nll_sum = (recon_sum + recon.sum().item(), kl_sum + kl.sum().item(),
                                      nll_sum + nll.sum().item())
        done = i + len(xb)
        progress.update(done, len(xb), nll=nll_sum / done)
    n = len(x)
    return {"test_neg_elbo_nats": (recon_sum + kl_sum) / n, "test_recon_nats": recon_sum / n,
            "test_kl_nats": kl_sum / n, "test_nll_nats": nll_sum / n,
            # bits/dim = nats / (D ln 2): the same number in the unit of compression
            "test_bits_per_dim": nll_sum / n / (D * math.log(2)), "iw_samples": k}


@torch.no_grad()
def sample(model, n, device, seed=0):
    """Bernoulli means sigmoid(logits) of decodes of z ~ P(z) = N(0, I): (n, 1, 28, 28).
    The noise comes from its own generator, so every run shows the same z."""
    model.eval()
    z = torch.randn(n, model.z_dim, generator=torch.Generator().manual_seed(seed))
    return torch.sigmoid(model.decode(z.to(device))).view(n, 1, 28, 28).cpu()


@torch.no_grad()
def reconstruct(model, x, device):
    """Decoder means at the posterior means, sigmoid(decode(mu(x))): (B, 1, 28, 28)."""
    model.eval()
    mu, _ = model.encode(x.to(device))
    return torch.sigmoid(model.decode(mu)).view(-1, 1, 28, 28).cpu()


@torch.no_grad()
def interpolate(model, x_a, x_b, device, steps=10):
    """Decodes of (1 - t) mu_a + t mu_b for t in [0, 1]: (pairs * steps, 1, 28, 28)."""
    model.eval()
    z_a, _ = model.encode(x_a.to(device))
    z_b, _ = model.encode(x_b.to(device))
    t = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
    z = (1 - t) * z_a[:, None] + t * z_b[:, None]                # (pairs, steps, Z)
    return torch.sigmoid(model.decode(z.flatten(0, 1))).view(-1, 1, 28, 28).cpu()


@torch.no_grad()
def manifold(model, device, n=20):
    """For Z = 2: decodes over an n x n grid of equal prior probability mass, z =
    Phi^-1(u) for u evenly spaced in (0, 1); Phi^-1(u) = sqrt(2) erfinv(2u - 1)."""
    model.eval()
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n)
    g = math.sqrt(2) * torch.erfinv(2 * u - 1)                   # (n,)
    z = torch.stack([g.repeat(n), g.flip(0).repeat_interleave(n)], 1)  # (n*n, 2), z2 up
    return torch.sigmoid(model.decode(z.to(device))).view(-1, 1, 28, 28).cpu()


def write_outputs(model, x_test, args, device, out):
    """samples.png/.npy, recon.png, interp.png and, for Z = 2, manifold.png.
    x_test (N, D) is the fixed test set the metrics use."""
    n = args.num_samples
    samples = sample(model, n, device, seed=args.seed)
    atomic_write(out / "samples.npy", lambda f: np.save(f, samples.numpy()))  # (N, 1, 28, 28) in [0, 1]
    write_png(out / "samples.png", image_grid(samples, ncol=min(n, 16)))
    # recon.png: rows of 16 test digits, each row followed by its reconstruction.
    cols = min(16, len(x_test))
    rows = min(4, len(x_test) // cols)
    x = x_test[:rows * cols]
    x_hat = reconstruct(model, x, device)
    pairs = torch.stack([x.view(rows, cols, 1, 28, 28), x_hat.view(rows, cols, 1, 28, 28)], 1)
    write_png(out / "recon.png", image_grid(pairs.reshape(-1, 1, 28, 28), ncol=cols))
    # interp.png: the autoencoder's 8 pairs of test digits (100+i, 200+i), 10 steps each.
    i = torch.arange(8)
    interp = interpolate(model, x_test[(100 + i) % len(x_test)], x_test[(200 + i) % len(x_test)],
                         device)
    write_png(out / "interp.png", image_grid(interp, ncol=10))
    if model.z_dim == 2:
        write_png(out / "manifold.png", image_grid(manifold(model, device), ncol=20))


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE / "data" / "mnist"),
                   help="folder with the four MNIST idx .gz files (downloaded if missing)")
    p.add_argument("--out", default=f"runs/{SCRIPT}", help="output folder")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--steps", type=int, default=0, help="cap on optimizer steps (0: no cap)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine-decayed to 0")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning rate: cosine decay from --lr to 0, or --lr throughout")
    p.add_argument("--z-dim", type=int, default=32, help="latent dimensions (2 adds manifold.png)")
    p.add_argument("--hidden", type=int, default=512, help="units of each hidden layer")
    p.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli",
                   help="decoder P_D(x|z): Bernoulli on binarised pixels, or a fixed-sigma "
                        "Gaussian on grey levels (densities: not comparable to papers)")
    p.add_argument("--sigma", type=float, default=0.1, help="std of the Gaussian likelihood")
    p.add_argument("--iw-samples", type=int, default=100,
                   help="k of the importance-weighted test likelihood (5000 in Burda et al.)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on the first N test images only (0: all 10,000)")
    p.add_argument("--sample-only", action="store_true",
                   help="skip training: load --ckpt, evaluate and sample")
    p.add_argument("--ckpt", help="checkpoint to load with --sample-only")
    args = p.parse_args(argv)
    if args.sample_only and not args.ckpt:
        p.error("--sample-only needs --ckpt PATH")
    for flag in ("epochs", "batch_size", "z_dim", "hidden", "num_samples", "iw_samples"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.steps < 0 or args.test_limit < 0:
        p.error("--steps and --test-limit must be >= 0")
    if not (args.lr > 0 and args.sigma > 0):
        p.error("--lr and --sigma must be positive")
    return args


def load_model(path, device):
    """Rebuild the VAE a checkpoint was trained as, with its weights."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    try:
        model = VAE(cfg["z_dim"], cfg["hidden"], cfg["likelihood"], cfg["sigma"]).to(device)
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise RunError(f"{path}: weights do not fit the config stored with them "
                       f"({type(e).__name__})") from None
    return model


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_test, _ = mnist_tensors(args.data_dir, "test")
    if args.sample_only:
        model = load_model(args.ckpt, device)
        steps, train_seconds = 0, 0.0
    else:
        x_train, _ = mnist_tensors(args.data_dir, "train")
        x_train = x_train.flatten(1).to(device)                  # (N, D) grey levels
        model = VAE(args.z_dim, args.hidden, args.likelihood, args.sigma).to(device)
        model.init_output_bias(x_train.mean(0))
        start = time.time()
        steps = train(model, x_train, args, device)
        train_seconds = time.time() - start
        save_checkpoint(out / "model.pt", model.state_dict(), vars(args))
    x_test = fixed_test_set(x_test, model.likelihood)            # (N, D)
    x_eval = x_test[:args.test_limit or None]
    start = time.time()
    metrics = evaluate(model, x_eval, device, args.iw_samples)
    eval_seconds = time.time() - start
    write_outputs(model, x_test, args, device, out)
    metrics.update(train_seconds=round(train_seconds, 1), eval_seconds=round(eval_seconds, 1),
                   steps=steps, device=str(device), test_images=len(x_eval),
                   likelihood=model.likelihood)
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
