"""Variational auto-encoder (VAE) with an honest likelihood, on binarised MNIST or your images.

The auto-encoder of autoencoder.py made probabilistic: a prior P(z) = N(0, I), a decoder
P_D(x|z) (one Bernoulli per pixel, given by its logit) and an encoder Q(z|x) =
N(mu(x), diag(exp(logvar(x)))) that stands in for the intractable true posterior P(z|x).
Training maximises the evidence lower bound, per image in nats,

    log P(x) >= ELBO = E_{z~Q(z|x)}[log P_D(x|z)] - KL(Q(z|x) || P(z)),

as the loss -ELBO = recon + kl: recon = -log P_D(x|z) summed over the D pixels at one z
drawn by the reparametrisation trick, z = mu + sigma * eps with eps ~ N(0, I) (so gradients
flow through the sample into mu and logvar), and kl in closed form. The test likelihood is
the importance-weighted estimate, z_k ~ Q(z|x), which rises towards log P(x) as k grows,

    log P(x) ~= logsumexp_k [log P_D(x|z_k) + log P(z_k) - log Q(z_k|x)] - log k.

Kingma & Welling (2014); Burda, Grosse & Salakhutdinov (2016): 86.76 nats at k = 5000 for this
kind of model. Training images are binarised afresh for every batch (pixel ~ Bernoulli of its
intensity, also your grey or colour images), the test set once with a fixed seed. MLPs
D-512-512-(mu, logvar) and Z-512-512-D; Adam, batch 256, lr 2e-3 with a cosine decay to zero.
Samples are blurry: a Bernoulli mean averages what the Gaussian Q cannot tell apart. Shapes:
B batch, C H W channels, height, width, D = C H W pixels, Z latent dims, K importance samples.

Run: python vae.py [--data my_images.npy] (--z-dim 2 adds manifold.png; a smoke run: --steps 2
--test-limit 100 --num-samples 10). A default run (MNIST, about 6 minutes on 2 CPU cores) writes
runs/vae/ (model.pt, metrics.json, samples, recon .png/.npy, interp.png), test_nll_nats 87.2.
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
import torch.nn.functional as F

SCRIPT = "vae"
TEST_BINARIZATION_SEED = 1234  # the test set is binarised once, the same for every run


# ============================================================================= the method

class VAE(nn.Module):
    """Encoder x -> (mu, logvar) of Q(z|x), decoder z -> logits of P_D(x|z): MLPs over D = C H W
    pixels. model(x), x (B, C, H, W), returns (logits (B, C, H, W) at one z ~ Q(z|x), mu, logvar);
    elbo_terms(model, x) makes the loss's terms of them. Gaussian: mean sigmoid(logits), fixed sigma."""

    def __init__(self, z_dim=32, hidden=512, likelihood="bernoulli", sigma=0.1, image_shape=(1, 28, 28)):
        super().__init__()
        self.config = {"z_dim": z_dim, "hidden": hidden, "likelihood": likelihood,
                       "sigma": sigma, "image_shape": list(image_shape)}   # rebuilds it
        self.z_dim, self.likelihood, self.sigma = z_dim, likelihood, sigma
        self.image_shape, D = tuple(image_shape), math.prod(image_shape)
        self.encoder = nn.Sequential(nn.Linear(D, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                     nn.SiLU(), nn.Linear(hidden, 2 * z_dim))  # (B, 2Z): mu, logvar
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                     nn.SiLU(), nn.Linear(hidden, D))          # (..., D) logits

    @torch.no_grad()
    def init_output_bias(self, mean_image):
        """Start at 'each pixel on with its mean frequency': the first steps learn digits, not
        the background."""
        p = mean_image.flatten().clamp(1e-3, 1 - 1e-3)
        self.decoder[-1].bias.copy_(torch.log(p) - torch.log1p(-p))  # logit(p)

    def encode(self, x):
        """x (B, C, H, W) -> mu (B, Z), logvar (B, Z) of Q(z|x)."""
        return self.encoder(x.flatten(1)).chunk(2, dim=-1)

    def decode(self, z):
        """z (..., Z) -> logits (..., C, H, W) of P_D(x|z)."""
        return self.decoder(z).unflatten(-1, self.image_shape)

    def forward(self, x):
        mu, logvar = self.encode(x)
        return self.decode(reparametrize(mu, logvar)), mu, logvar

    def log_px(self, logits, x):
        """log P_D(x|z) in nats, summed over the pixels: (...,) for logits (..., C, H, W)."""
        logits, x = logits.flatten(-3), x.flatten(-3)            # (..., D)
        if self.likelihood == "gaussian":
            return gaussian_log_likelihood(torch.sigmoid(logits), x, self.sigma)
        return bernoulli_log_likelihood(logits, x)


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
    return (-0.5 * ((x - mean) / sigma).pow(2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


def log_normal(z, mu, logvar):
    """log N(z; mu, diag(exp(logvar))), summed over the Z dims: (...,)."""
    # log N = -0.5 * sum(log 2pi + logvar + (z - mu)^2 / exp(logvar))
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def reparametrize(mu, logvar, eps=None):
    """A sample of Q(z|x) that is a differentiable function of mu and logvar."""
    if eps is None:
        eps = torch.randn_like(mu)
    # z = mu + sigma * eps, sigma = exp(0.5 * logvar)
    return mu + torch.exp(0.5 * logvar) * eps


def elbo_terms(model, x):
    """The two terms of -ELBO per image, in nats, each (B,), for x (B, C, H, W) (binary for
    the Bernoulli likelihood): recon = -log P_D(x|z) at one z ~ Q(z|x), kl = KL(Q(z|x) || P(z))."""
    logits, mu, logvar = model(x)
    return -model.log_px(logits, x), gaussian_kl(mu, logvar)


def iwae_log_likelihood(model, x, k, chunk=100):
    """Importance-weighted estimate of log P(x) with k samples, per image: (B,).
    log P(x) ~= logsumexp_k [log P_D(x|z_k) + log P(z_k) - log Q(z_k|x)] - log k, a lower
    bound in expectation that rises towards log P(x) as k grows; k = 1 is the ELBO with a
    sampled KL. The decoder sees `chunk` samples at a time, so k = 5000 needs no more memory
    than k = 100."""
    mu, logvar = model.encode(x)                                 # (B, Z)
    log_w = []
    for start in range(0, k, chunk):
        eps = torch.randn(min(chunk, k - start), *mu.shape, device=mu.device)
        z = reparametrize(mu, logvar, eps)                       # (K', B, Z)
        log_prior = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        # log w = log P_D(x|z) + log P(z) - log Q(z|x)
        log_w.append(model.log_px(model.decode(z), x) + log_prior - log_normal(z, mu, logvar))
    log_w = torch.cat(log_w)                                     # (K, B)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


@torch.no_grad()
def sample(model, n, seed=0):
    """Bernoulli means sigmoid(logits) of decodes of z ~ P(z) = N(0, I), (n, C, H, W) on the
    CPU; the noise from a generator of its own, so every run shows the same z."""
    z = torch.randn(n, model.z_dim, generator=torch.Generator().manual_seed(seed))
    return torch.sigmoid(model.decode(z.to(model.decoder[0].weight.device))).cpu()


@torch.no_grad()
def interpolate(model, x_a, x_b, steps=10):
    """Decodes of (1 - t) mu_a + t mu_b for t in [0, 1]: (pairs * steps, C, H, W)."""
    (z_a, _), (z_b, _) = (model.encode(x.to(model.decoder[0].weight.device)) for x in (x_a, x_b))
    t = torch.linspace(0, 1, steps, device=z_a.device).view(1, steps, 1)
    z = (1 - t) * z_a[:, None] + t * z_b[:, None]                # (pairs, steps, Z)
    return torch.sigmoid(model.decode(z.flatten(0, 1))).cpu()


@torch.no_grad()
def manifold(model, n=20):
    """For Z = 2: decodes (n*n, C, H, W) over the n x n grid of equal prior mass, z2 pointing
    up: z = Phi^-1(u) for u evenly spaced in (0, 1), Phi^-1(u) = sqrt(2) erfinv(2u - 1)."""
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n)
    g = math.sqrt(2) * torch.erfinv(2 * u - 1)                   # (n,) normal quantiles
    z = torch.stack([g.repeat(n), g.flip(0).repeat_interleave(n)], 1)   # (n*n, 2), row by row
    return torch.sigmoid(model.decode(z.to(model.decoder[0].weight.device))).cpu()


# ============================================================================= the experiment

def fixed_test_set(x_test, likelihood):
    """The test images (N, C, H, W) the metrics are computed on: binarised once with a fixed
    seed (on the CPU, so every device sees the same bits), or grey levels for Gaussian."""
    if likelihood == "gaussian":
        return x_test
    return torch.bernoulli(x_test, generator=torch.Generator().manual_seed(TEST_BINARIZATION_SEED))


def train(model, x_train, epochs, batch_size, lr, max_steps=0, schedule="cosine"):
    """Adam on -ELBO for `epochs`, at most max_steps steps (0: no cap), on x_train (N, C, H, W)
    on the model's device. Returns the number of steps taken and the seconds they took."""
    batch = min(batch_size, len(x_train))
    per_epoch = len(x_train) // batch
    total = min(epochs * per_epoch, max_steps or math.inf)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    progress, step = Progress(total), 0
    while step < total:  # an epoch: a fresh random order, the last partial batch dropped
        order = torch.randperm(len(x_train), device=x_train.device)
        for idx in order.split(batch)[:min(per_epoch, total - step)]:
            if schedule == "cosine":  # from lr at step 0 down to 0 at step total
                opt.param_groups[0]["lr"] = lr * (0.5 * (1 + math.cos(math.pi * step / total)))
            xb = x_train[idx]                                    # (B, C, H, W) grey levels
            if model.likelihood == "bernoulli":
                xb = torch.bernoulli(xb)  # dynamic binarisation: fresh bits every time
            recon, kl = elbo_terms(model, xb)
            loss = (recon + kl).mean()                           # -ELBO, nats per image
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            progress(step, batch, neg_elbo=loss.detach(), recon=recon.mean().detach(),
                     kl=kl.mean().detach(), lr=opt.param_groups[0]["lr"])
    return step, time.time() - progress.start   # the last progress line waited for the GPU


@torch.no_grad()
def evaluate(model, x, k, batch_size=100):
    """Test metrics, nats per image, on x (N, C, H, W): -ELBO and its two terms (one sample
    of z per image), the k-sample importance-weighted -log P(x), and it in bits per pixel."""
    sums, progress = torch.zeros(3, dtype=torch.float64), Progress(len(x), label="eval")
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(model.decoder[0].weight.device)
        recon, kl = elbo_terms(model, xb)
        sums += torch.stack([recon.sum(), kl.sum(), -iwae_log_likelihood(model, xb, k).sum()]).cpu()
        progress(i + len(xb), len(xb), nll=sums[2] / (i + len(xb)))
    (recon, kl, nll), n = sums.tolist(), len(x)
    return {"test_neg_elbo_nats": (recon + kl) / n, "test_recon_nats": recon / n, "test_kl_nats": kl / n,
            "test_nll_nats": nll / n, "iw_samples": k, "test_images": n,  # and in bits per pixel:
            "test_bits_per_dim": nll / n / (x[0].numel() * math.log(2))}  # nats / (D ln 2)


def write_outputs(model, x_test, samples, out, device):
    """samples.npy/.png, recon.npy/.png (test images x_test (N, C, H, W), recon.png's rows each
    followed by its reconstructions), interp.png (autoencoder.py's test pairs), manifold.png."""
    with torch.no_grad():  # decoder means at the posterior means mu(x)
        recon = torch.sigmoid(model.decode(model.encode(x_test[:500].to(device))[0])).cpu()
    for name, images in (("samples", samples), ("recon", recon)):   # (N, C, H, W) in [0, 1]
        atomic_write(out / f"{name}.npy", lambda f: np.save(f, images.numpy()))
    write_png(out / "samples.png", image_grid(samples, ncol=min(len(samples), 16)))
    ncol = min(16, len(x_test))
    n = min(4, len(x_test) // ncol) * ncol                      # up to 4 whole rows
    rows = torch.stack([x_test[:n], recon[:n]]).unflatten(1, (-1, ncol)).transpose(0, 1)
    write_png(out / "recon.png", image_grid(rows.flatten(0, 2), ncol=ncol))
    pairs = min(8, len(x_test) // 2)
    write_png(out / "interp.png", image_grid(interpolate(model, x_test[:pairs], x_test[pairs:2 * pairs]), 10))
    if model.z_dim == 2:
        write_png(out / "manifold.png", image_grid(manifold(model), ncol=20))


# ============================================================================= main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],   # a whole sentence
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--data", default="mnist", help="mnist, or images.npy: (N, [C,] H, W), uint8 or [0, 1]")
    add("--data-dir", default=str(Path(__file__).parent / "data" / "mnist"), help="MNIST's folder")
    add("--out", help="output folder (None: runs/vae, or sample_only/ beside --ckpt)")
    add("--epochs", type=positive_int, default=80, help="passes over the training set")
    add("--steps", type=nonnegative_int, default=0, help="cap on optimizer steps (0: no cap)")
    add("--batch-size", type=positive_int, default=256, help="images per step")
    add("--lr", type=positive_float, default=2e-3, help="Adam's peak learning rate")
    add("--schedule", choices=["cosine", "constant"], default="cosine", help="cosine: the lr decays to 0")
    add("--z-dim", type=positive_int, default=32, help="latent dimensions (2 adds manifold.png)")
    add("--hidden", type=positive_int, default=512, help="units of each hidden layer")
    add("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli",
        help="P_D(x|z): Bernoulli on binarised pixels, or Gaussian (--sigma) on grey levels")
    add("--sigma", type=positive_float, default=0.1, help="std of the Gaussian likelihood")
    add("--iw-samples", type=positive_int, default=100, help="k of the importance-weighted -log P(x)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    add("--seed", type=nonnegative_int, default=0, help="seeds training and samples, not test bits")
    add("--num-samples", type=positive_int, default=64, help="samples to draw")
    add("--test-limit", type=nonnegative_int, default=0, help="test images used (0: all)")
    add("--sample-only", action="store_true", help="no training: load --ckpt, evaluate, sample")
    add("--ckpt", help="model.pt to load with --sample-only")
    args = p.parse_args(argv)
    if args.sample_only != (args.ckpt is not None):
        p.error("--sample-only and --ckpt PATH go together")
    for name in ("z_dim", "hidden", "likelihood", "sigma", "epochs", "steps", "batch_size", "lr",
                 "schedule"):
        if args.sample_only and getattr(args, name) != p.get_default(name):
            p.error(f"--{name.replace('_', '-')} shapes or trains a model; --sample-only loads --ckpt's")
    return args


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out or (Path(args.ckpt).parent / "sample_only" if args.ckpt else f"runs/{SCRIPT}"))
    if args.sample_only and (out / "model.pt").exists():
        raise RunError(f"--out {out} holds a training run (model.pt); --sample-only writes elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    x_test, _ = load_images(args.data, args.data_dir, "test")   # (N, C, H, W) grey levels
    shape = list(x_test.shape[1:])
    if args.sample_only:  # built for the data's image shape: another one fails in one line
        model, _ = load_checkpoint(args.ckpt, lambda config: VAE(**{**config, "image_shape": shape}))
        model, steps, train_seconds = model.to(device), 0, 0.0
    else:
        x_train = load_images(args.data, args.data_dir, "train")[0].to(device)
        model = VAE(args.z_dim, args.hidden, args.likelihood, args.sigma, shape).to(device)
        model.init_output_bias(x_train.mean(0))
        steps, train_seconds = train(model, x_train, args.epochs, args.batch_size, args.lr,
                                     args.steps, args.schedule)
        save_checkpoint(out / "model.pt", model.config, model.state_dict())
    x_eval = fixed_test_set(x_test, model.likelihood)[:args.test_limit or None]  # (N, C, H, W)
    metrics = evaluate(model, x_eval, args.iw_samples)
    metrics.update(train_seconds=round(train_seconds, 1), steps=steps, device=str(device),
                   likelihood=model.likelihood)
    write_outputs(model, x_eval, sample(model, args.num_samples, seed=args.seed), out, device)
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (RunError, OSError) as e:
        sys.exit(f"error: {e}")


# ============================================================================= appendix: plumbing every script repeats

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
