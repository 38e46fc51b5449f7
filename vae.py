"""Variational auto-encoder (VAE) on binarised MNIST, with an honest likelihood.

The auto-encoder of autoencoder.py made probabilistic: a prior P(z) = N(0, I), a
decoder P_D(x|z) (one Bernoulli per pixel, given by its logit) and an encoder
Q(z|x) = N(mu(x), diag(exp(logvar(x)))) that stands in for the intractable true
posterior P(z|x). Training maximises the evidence lower bound, per image in nats,

    log P(x) >= ELBO = E_{z~Q(z|x)}[log P_D(x|z)] - KL(Q(z|x) || P(z)),

as the loss -ELBO = recon + kl: recon = -log P_D(x|z) summed over the 784 pixels at
one z drawn by the reparametrisation trick, z = mu + sigma * eps with eps ~ N(0, I)
(so gradients flow through the sample into mu and logvar), and kl in closed form.
The test likelihood is the importance-weighted estimate, z_k ~ Q(z|x),

    log P(x) ~= logsumexp_k [log P_D(x|z_k) + log P(z_k) - log Q(z_k|x)] - log k,

which rises towards log P(x) as k grows; test_nll_nats is its negation at k = 100
(--iw-samples; Burda et al. report 86.76 nats at k = 5000 for this kind of model).

Setting: training images binarised afresh for every batch (pixel ~ Bernoulli of its
intensity), the test set binarised once with a fixed seed, whatever --seed says.
MLPs 784-512-512 -> (mu, logvar) and 32-512-512 -> 784 with SiLU (dense products are
the cheapest FLOPs on a CPU); Adam, batch 256, lr 2e-3 with a cosine decay to zero.
Samples come out blurry: a Bernoulli mean averages what the Gaussian Q cannot tell
apart. Shape legend: B batch, D = 784 pixels, Z latent dims, K importance samples.

Papers: Kingma & Welling, "Auto-Encoding Variational Bayes" (2014); Burda, Grosse
& Salakhutdinov, "Importance Weighted Autoencoders" (2016).

Run:   python vae.py                  (about 7 min on a 2-core CPU; --steps 2: smoke)
       python vae.py --z-dim 2        (adds manifold.png)
       python vae.py --sample-only --ckpt runs/vae/model.pt --iw-samples 5000
Default run: runs/vae/ with test_nll_nats about 87.2 (k = 100), the digit judge's
sample_fd and recon_fd, samples, reconstructions and interpolations as pictures.
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
D = 28 * 28                    # pixels per image
LOG_2PI = math.log(2 * math.pi)


# ============================================================================= the method: model

class VAE(nn.Module):
    """Encoder x -> (mu, logvar) of Q(z|x); decoder z -> the logits of P_D(x|z).

    Both are two-hidden-layer MLPs. With the Gaussian likelihood (--likelihood
    gaussian) the decoder's mean is sigmoid(logits) and sigma is fixed."""

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


# ============================================================================= the method: objective

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


def iwae_log_likelihood(model, x, k, chunk=100, eps=None):
    """Importance-weighted estimate of log P(x) with k samples, per image: (B,).

    log P(x) ~= logsumexp_k [log P_D(x|z_k) + log P(z_k) - log Q(z_k|x)] - log k,
    a lower bound in expectation that rises towards log P(x) as k grows (Burda et
    al. 2016); k = 1 is the ELBO with a sampled KL. The decoder sees `chunk`
    samples at a time, so k = 5000 needs no more memory than k = 100. eps (K, B, Z),
    if given, replaces the N(0, I) draws (the tests pass their own)."""
    mu, logvar = model.encode(x)                                 # (B, Z)
    log_w = []
    for start in range(0, k, chunk):
        e = (torch.randn(min(chunk, k - start), *mu.shape, device=mu.device) if eps is None
             else eps[start:start + chunk])
        z = reparametrize(mu, logvar, e)                         # (K', B, Z)
        log_prior = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        # log w = log P_D(x|z) + log P(z) - log Q(z|x)
        log_w.append(model.log_px(model.decode(z), x) + log_prior - log_normal(z, mu, logvar))
    log_w = torch.cat(log_w)                                     # (K, B)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


# ============================================================================= the method: sampling

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


def normal_quantile_grid(n):
    """The n x n latent grid of equal prior probability mass, (n*n, 2), z2 pointing up:
    z = Phi^-1(u) for u evenly spaced in (0, 1), Phi^-1(u) = sqrt(2) erfinv(2u - 1)."""
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n)
    g = math.sqrt(2) * torch.erfinv(2 * u - 1)                   # (n,)
    return torch.stack([g.repeat(n), g.flip(0).repeat_interleave(n)], 1)


@torch.no_grad()
def manifold(model, device, n=20):
    """For Z = 2: decodes over the n x n grid of equal prior mass: (n*n, 1, 28, 28)."""
    model.eval()
    z = normal_quantile_grid(n)
    return torch.sigmoid(model.decode(z.to(device))).view(-1, 1, 28, 28).cpu()


# ============================================================================= the experiment: data

TEST_BINARIZATION_SEED = 1234  # the test set is binarised once, the same for every run


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


# ============================================================================= the experiment: training

def cosine_lr(step, total, warmup=0):
    """Learning-rate multiplier at step 0, 1, ..: linear warm-up (step + 1) / warmup for
    step < warmup, then 0.5 (1 + cos(pi (step - warmup) / (total - warmup))), from 1
    down to 0 at step = total."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def minibatches(n, batch, total, device):
    """Index tensors (B,) of `total` minibatches: a fresh random order of the n
    examples every epoch, each epoch's last partial batch dropped."""
    per_epoch = n // batch
    for first in range(0, total, per_epoch):
        order = torch.randperm(n, device=device)
        for i in range(min(per_epoch, total - first)):
            yield order[i * batch:(i + 1) * batch]


def train(model, x_train, args, device, log_every=50):
    """Adam on -ELBO at learning rate lr * cosine_lr(step, total) (or lr throughout);
    x_train (N, D) grey levels on `device`, binarised afresh for every batch when the
    likelihood is Bernoulli. Returns the number of steps taken."""
    batch = min(args.batch_size, len(x_train))
    total = args.epochs * (len(x_train) // batch)
    if args.steps:
        total = min(total, args.steps)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    progress, logged = Progress(total), 0
    model.train()
    for step, idx in enumerate(minibatches(len(x_train), batch, total, device), 1):
        lr = args.lr * (cosine_lr(step - 1, total) if args.schedule == "cosine" else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        xb = x_train[idx]                                        # (B, D)
        if model.likelihood == "bernoulli":
            xb = binarize(xb)                                    # fresh bits every time
        recon, kl = elbo_terms(model, xb)
        loss = (recon + kl).mean()                               # -ELBO, nats per image
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == total:               # the only host syncs
            check_finite(step, loss=loss)
            progress.update(step, (step - logged) * batch, neg_elbo=loss.item(),
                            recon=recon.mean().item(), kl=kl.mean().item(), lr=lr)
            logged = step
    return total


def fit(args, x_train, device, out):
    """A fresh VAE trained on x_train (N, 1, 28, 28), saved to out/model.pt.
    Returns the model, its steps and the training time in seconds."""
    x = x_train.flatten(1).to(device)                            # (N, D) grey levels
    model = VAE(args.z_dim, args.hidden, args.likelihood, args.sigma).to(device)
    model.init_output_bias(x.mean(0))
    start = time.time()
    steps = train(model, x, args, device)
    train_seconds = seconds_since(start, device)
    save_checkpoint(out / "model.pt", model.state_dict(), vars(args))
    return model, steps, train_seconds


def seconds_since(start, device):
    """Wall time since `start`, after the GPU (if any) has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time() - start


# ============================================================================= the experiment: evaluation and outputs

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


def write_outputs(model, x_test, args, device, out):
    """samples.png/.npy, recon.png, interp.png and, for Z = 2, manifold.png.
    x_test (N, D) is the fixed test set the metrics use. Returns the samples."""
    n = args.num_samples
    samples = sample(model, n, device, seed=args.seed)           # (N, 1, 28, 28) in [0, 1]
    atomic_write(out / "samples.npy", lambda f: np.save(f, samples.numpy()))
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
    return samples


# ============================================================================= main

POSITIVE = ("epochs", "batch_size", "lr", "z_dim", "hidden", "sigma", "iw_samples", "num_samples")
NONNEGATIVE = ("steps", "test_limit", "seed")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE / "data" / "mnist"),
                   help="folder with the four MNIST idx .gz files (downloaded if missing)")
    p.add_argument("--out", default=f"runs/{SCRIPT}", help="output folder")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--steps", type=int, default=0,
                   help="cap on optimizer steps, and on the digit judge's (0: no cap)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
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
    p.add_argument("--seed", type=int, default=0, help="training randomness and sample noise "
                   "(the test set's binarisation does not follow it)")
    p.add_argument("--num-samples", type=int, default=64,
                   help="samples drawn, and the N of the digit judge's sample_fd")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on the first N test images only (0: all 10,000)")
    p.add_argument("--sample-only", action="store_true",
                   help="skip training: load --ckpt, evaluate and sample (eval_metrics.json)")
    p.add_argument("--ckpt", help="checkpoint to load with --sample-only")
    args = p.parse_args(argv)
    check_flags(p, args, positive=POSITIVE, nonnegative=NONNEGATIVE)
    if args.seed >= 2 ** 32:
        p.error(f"--seed must be < 2**32 (got {args.seed})")
    if args.sample_only and not args.ckpt:
        p.error("--sample-only needs --ckpt PATH")
    if args.ckpt and not args.sample_only:
        p.error("--ckpt is read only with --sample-only")
    return args


def load_model(path, device):
    """Rebuild the VAE a checkpoint was trained as, with its weights, or fail in one line."""
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, {"z_dim": int, "hidden": int, "likelihood": str,
                                   "sigma": float}, path)
    if not (cfg["z_dim"] >= 1 and cfg["hidden"] >= 1 and cfg["sigma"] > 0
            and cfg["likelihood"] in ("bernoulli", "gaussian")):
        raise RunError(f"{path}: config out of range (z_dim {cfg['z_dim']}, hidden "
                       f"{cfg['hidden']}, likelihood {cfg['likelihood']!r}, sigma {cfg['sigma']})")
    state = ckpt["model"]
    first = state.get("decoder.0.weight") if isinstance(state, dict) else None
    if not isinstance(first, torch.Tensor) or tuple(first.shape) != (cfg["hidden"], cfg["z_dim"]):
        raise RunError(f"{path}: weights do not fit the config stored with them")
    model = VAE(cfg["z_dim"], cfg["hidden"], cfg["likelihood"], cfg["sigma"])
    load_weights(model, state, path)
    return model.to(device)


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = prepare_out_dir(args.out)
    x_test, y_test = mnist_tensors(args.data_dir, "test")       # (N, 1, 28, 28) grey levels
    x_train, y_train = mnist_tensors(args.data_dir, "train")
    if args.sample_only:
        model, steps, train_seconds = load_model(args.ckpt, device), 0, 0.0
    else:
        model, steps, train_seconds = fit(args, x_train, device, out)
    x_fixed = fixed_test_set(x_test, model.likelihood)           # (N, D)
    x_eval = x_fixed[:args.test_limit or None]
    start = time.time()
    metrics = evaluate(model, x_eval, device, args.iw_samples)
    eval_seconds = seconds_since(start, device)
    samples = write_outputs(model, x_fixed, args, device, out)
    metrics.update(train_seconds=round(train_seconds, 1), eval_seconds=round(eval_seconds, 1),
                   steps=steps, device=str(device), test_images=len(x_eval),
                   likelihood=model.likelihood)
    # The digit judge: samples are Bernoulli means of decodes of z ~ P(z); recons are
    # decoder means of the first test images, judged against the real grey digits.
    recons = reconstruct(model, x_fixed[:len(samples)], device)
    metrics.update(judge_report(out, device, x_train, y_train, x_test, y_test, samples=samples,
                                recons=recons, judge_steps=args.steps or None))
    write_metrics(out / ("eval_metrics.json" if args.sample_only else "metrics.json"), metrics)
    print(json.dumps(metrics))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        sys.exit(f"error: {e}")


# ============================================================================= appendix: plumbing every script repeats

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
def png_bytes(pixels, bit_depth=8):
    """Encode pixels as a PNG file's bytes: uint8 (H, W) grey or (H, W, 3) RGB at bit depth 8,
    or a (H, W) array of 0/1 at bit depth 1 (eight pixels a byte, rows padded to whole bytes)."""
    pixels = np.ascontiguousarray(pixels)
    h, w = pixels.shape[:2]
    if bit_depth == 1:
        if pixels.ndim != 2 or not np.isin(pixels, (0, 1)).all():
            raise ValueError("a 1-bit PNG takes a (H, W) array of 0s and 1s")
        rows = np.packbits(pixels.astype(np.uint8), axis=1)  # (H, ceil(W / 8)), MSB first
        colour_type = 0
    elif bit_depth == 8:
        rows = pixels.astype(np.uint8)
        colour_type = 2 if pixels.ndim == 3 else 0  # 2 = RGB, 0 = greyscale
    else:
        raise ValueError(f"bit depth {bit_depth} is not written here (1 or 8)")
    # Each scanline starts with its filter type; 0 = none.
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)  # no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_png(path, pixels, bit_depth=8):
    atomic_write(path, lambda f: f.write(png_bytes(pixels, bit_depth)))


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


# --- shared: digit judge ---
# One ruler for every image script: a small MNIST classifier whose 128-number penultimate
# features stand in for Inception's in FID. FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2)
# between the features of two image sets (0 for identical sets), and a score
# exp E_x KL(p(y|x) || p(y)) between 1 (one class, or no confident class) and 10.
JUDGE_STEPS = 1500  # Adam steps of 128 digits for the full judge: about 3 epochs, 98.9 % test accuracy


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


def train_judge(x_train, y_train, device, steps, seed=0):
    """Cross-entropy training from a fixed seed, off the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = DigitJudge().to(device)
        opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(x_train), (min(128, len(x_train)),), generator=gen)
            loss = F.cross_entropy(judge(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return judge.eval()


@torch.no_grad()
def judge_outputs(judge, images, batch_size=500):
    """Features (N, 128) and class probabilities (N, 10), float64 numpy."""
    device = next(judge.parameters()).device
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        f = judge.features(images[i:i + batch_size].to(device, torch.float32).clamp(0, 1))
        feats.append(f.double().cpu())
        probs.append(torch.softmax(judge.head(f).double(), 1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def frechet_distance(feats_a, feats_b):
    """FD between Gaussians fitted to two feature sets (N, F); tr (C_a C_b)^1/2 via the
    symmetric product C_a^1/2 C_b C_a^1/2, which has the same eigenvalues."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) \
        - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(fd, 0.0))


def judge_score(probs):
    """exp E_x KL(p(y|x) || p(y)): high when each image is confidently one digit and all
    ten digits occur (the Inception score, with the judge in Inception's place)."""
    p_y = probs.mean(0, keepdims=True)
    kl = (probs * (np.log(probs + 1e-12) - np.log(p_y + 1e-12))).sum(1)
    return float(np.exp(kl.mean()))


def load_or_train_judge(path, device, x_train, y_train, x_test, y_test, steps):
    """The judge cached at `path`, checked by the sha256 and config in its .json beside it;
    trained again (and cached) when missing, damaged or made with other settings or data.
    Returns the judge and its accuracy on (x_test, y_test)."""
    if x_train.min() < 0 or x_train.max() > 1:
        raise ValueError("the digit judge takes images in [0, 1]")
    path, meta_path = Path(path), Path(path).with_suffix(".json")
    data = hashlib.sha256((x_train[::97] * 255).round().to(torch.uint8).cpu().numpy().tobytes()
                          + y_train.cpu().numpy().astype(np.int64).tobytes()).hexdigest()
    config = {"steps": int(steps), "seed": 0, "train_n": len(x_train), "data": data[:16],
              "version": 2}
    judge = None
    try:
        meta = json.loads(meta_path.read_text())
        blob = path.read_bytes()
        if meta["config"] == config and meta["sha256"] == hashlib.sha256(blob).hexdigest():
            judge = DigitJudge()
            judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            judge = judge.to(device).eval()
    except Exception:  # missing, unreadable or damaged: train a fresh one below
        judge = None
    if judge is None:
        print(f"training the digit judge ({steps} steps) -> {path}", flush=True)
        judge = train_judge(x_train, y_train, device, steps)
        atomic_write(path, lambda f: torch.save(judge.state_dict(), f))
        meta = {"config": config, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    _, probs = judge_outputs(judge, x_test)
    return judge, float((probs.argmax(1) == y_test.cpu().numpy()).mean())


def judge_report(out, device, x_train, y_train, x_test, y_test, samples=None,
                 sample_labels=None, recons=None, judge_steps=None):
    """Judge figures for metrics.json. Every set holds the same N images and is measured
    against the same reference, the test digits after the first N: the samples, the
    reconstructions of the first N test digits, and three anchors (those N real digits,
    the same binarised, uniform noise). judge_steps (smoke runs) trains a smaller judge."""
    steps = JUDGE_STEPS if judge_steps is None else min(int(judge_steps), JUDGE_STEPS)
    name = "digit_judge.pt" if judge_steps is None else f"digit_judge_{steps}steps.pt"
    judge, accuracy = load_or_train_judge(Path(out).resolve().parent / name, device,
                                          x_train, y_train, x_test, y_test, steps)
    sizes = [len(s) for s in (samples, recons) if s is not None]
    n = min(sizes + [len(x_test) // 2])
    ref, _ = judge_outputs(judge, x_test[n:])
    real = x_test[:n].cpu()
    binarised = torch.bernoulli(real, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    report = {"judge_test_accuracy": accuracy, "judge_n": n}
    for key, images in (("anchor_real", real), ("anchor_binarised", binarised),
                        ("anchor_noise", noise), ("sample", samples), ("recon", recons)):
        if images is None:
            continue
        feats, probs = judge_outputs(judge, images[:n])
        report[f"{key}_fd"] = frechet_distance(feats, ref)
        if key != "recon":
            report[f"{key}_score"] = judge_score(probs)
        if key == "sample" and sample_labels is not None:
            asked = torch.as_tensor(sample_labels)[:n].cpu().numpy()
            report["sample_label_match"] = float((probs.argmax(1) == asked).mean())
    return report
# --- end shared ---


if __name__ == "__main__":
    main()
