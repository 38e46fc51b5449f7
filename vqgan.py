"""VQ-GAN on MNIST: a vector-quantised tokenizer trained with a patch GAN, and a
small causal transformer that writes digits with its tokens.

Stage one, the tokenizer. An encoder E maps an image x to a grid of vectors
z_e = E(x) (7 x 7 for MNIST). Each vector is replaced by its nearest codebook entry,
z_q = e_k with k = argmin_j ||z_e - e_j||, and a decoder G maps the grid of codes back
to an image x_hat = G(z_q). The argmin has no gradient, so the decoder's gradient is
copied onto z_e (straight-through: z_q_st = z_e + sg[z_q - z_e]). The loss is

    L = L_rec + L_VQ + w_d * lambda * L_GAN
    L_rec = |x - x_hat|_1 + w_p * L_perc
    L_VQ  = ||sg[z_e] - z_q||^2 + beta * ||z_e - sg[z_q]||^2      (beta = 0.25 on the
            commitment term, which pulls the *encoder* to its code, as in van den Oord
            et al. 2017; the public VQGAN code long carried beta on the codebook term)
    L_GAN = -mean_patches D(x_hat)                                (hinge generator loss)
    lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped to
             [0, --max-lambda], G_L the decoder's last layer (Esser et al. 2021, eq. 7)

w_d = --disc-weight is the constant factor the paper's code puts on top of lambda
(0.8 there); 0.2 here, because at full weight this small model's reconstructions
fell apart when the GAN switched on (train L1 0.095 -> 0.54 in 50 steps). The
GAN term enters only after --disc-start steps: adversarial training
from step 0 ruins the early reconstructions. Codes unused for --restart-every
steps are restarted on random encoder outputs, so the codebook stays in use.

The discriminator D is a PatchGAN: a small conv net whose output is a 7 x 7 grid
of real/fake logits, each seeing an 18 x 18 patch, not one logit per image. It
has its own Adam (betas 0.5, 0.9) and the hinge loss on *detached* reconstructions:

    L_D = mean relu(1 - D(x)) + mean relu(1 + D(sg[x_hat]))

The perceptual term. The paper's is LPIPS, which needs pretrained VGG weights that
an offline, dependency-free script cannot have. Here L_perc is *feature matching
on the discriminator's intermediate features*: the mean L1 distance between
D's hidden activations on x and on x_hat (Larsen et al. 2016's "learned similarity";
Salimans et al. 2016). It needs no pretrained weights; --no-perceptual turns it
off. Because it reads D, D trains from step 0; only the generator's GAN term waits
for --disc-start (and --no-gan drops that term altogether, for the ablation).

Stage two, the prior. The training images' token grids are read in raster order and a
minimal causal transformer (attention written out by hand) models them
autoregressively, with the class label as the first token:

    p(k_1..k_49 | c) = prod_t p(k_t | c, k_<t),   trained by next-token cross-entropy.

Sampling draws k_t from softmax(logits / temperature), restricted to the top-k.

Shape legend: B batch, C channels, H W height width, K codebook size, D code dim,
T sequence length, E transformer width.

Run:   python vqgan.py                          (8 min 13 s on a 2-core CPU)
       -> test L1 0.030, PSNR 22.3 dB, codebook usage 1.00 (perplexity 198 of 256),
          prior 172 bits per image; samples read as digits of their class, mostly
          (a few 7s and 4s look like 9s). The ablation below, same 2000 steps:
          L1 0.020, PSNR 24.2 dB: at this size the GAN costs pixel fidelity.
       python vqgan.py --no-gan --prior-steps 0 --out runs/vqgan_nogan   (the ablation)
       python vqgan.py --sample-only --ckpt runs/vqgan/model.pt
Writes runs/vqgan/: recon.png (rows of test digits, each followed by its
reconstruction), samples.png (one row per class 0..9), samples.npy, model.pt,
metrics.json (test_recon_l1, test_psnr_db, codebook_usage, codebook_perplexity,
test_prior_nll_bits, ...).

References: Esser, Rombach & Ommer (2021), "Taming Transformers for High-Resolution
Image Synthesis"; van den Oord et al. (2017), "Neural Discrete Representation
Learning"; Isola et al. (2017) for PatchGAN; Lim & Ye (2017) for the hinge loss.
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

SCRIPT = "vqgan"
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

def mnist_tensors(data_dir, split):
    """Images as float (N, 1, 28, 28) in [-1, 1], and labels (N,).

    28 = 4 * 7, so two stride-2 steps give a 7 x 7 token grid; no padding needed."""
    images, labels = load_mnist(data_dir, split)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(labels)


def to_unit(x):
    """[-1, 1] -> [0, 1], clamped: how images are shown and scored."""
    return ((x + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------- stage one: model

class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))): the residual block of VQGAN's encoder/decoder."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, 1, 1),
            nn.GroupNorm(8, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.skip(x) + self.body(x)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in a codebook of K vectors of size D, with the
    straight-through gradient and the two VQ-VAE loss terms returned separately."""

    def __init__(self, K, D):
        super().__init__()
        self.codebook = nn.Embedding(K, D)
        self.codebook.weight.data.uniform_(-1.0 / K, 1.0 / K)
        # How often each code was chosen since the last restart (not saved).
        self.register_buffer("hits", torch.zeros(K), persistent=False)

    def forward(self, z_e):
        B, D, H, W = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, D)                    # (B*H*W, D)
        e = self.codebook.weight                                        # (K, D)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)
        indices = dist.argmin(1)                                        # (B*H*W,)
        z_q = e[indices].view(B, H, W, D).permute(0, 3, 1, 2)           # (B, D, H, W)
        # codebook = ||sg[z_e] - z_q||^2 moves the codes; commit = ||z_e - sg[z_q]||^2
        # moves the encoder (beta multiplies it in vq_loss).
        codebook = (z_e.detach() - z_q).pow(2).mean()
        commit = (z_e - z_q.detach()).pow(2).mean()
        # Straight-through: forward value z_q, gradient d/dz_q copied onto z_e.
        z_q_st = z_e + (z_q - z_e).detach()
        if self.training:
            self.hits += torch.bincount(indices, minlength=e.shape[0]).to(self.hits.dtype)
        return z_q_st, indices.view(B, H, W), codebook, commit

    @torch.no_grad()
    def restart_dead_codes(self, z_e):
        """Move every code not chosen since the last call onto a random encoder
        output of this batch (plus a little noise), so it will be used again."""
        dead = (self.hits == 0).nonzero().squeeze(1)
        if len(dead):
            flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
            pick = torch.randint(len(flat), (len(dead),), device=flat.device)
            self.codebook.weight.data[dead] = flat[pick] + 0.01 * torch.randn_like(flat[pick])
        self.hits.zero_()
        return len(dead)


def vq_loss(codebook, commit, beta):
    """L_VQ = codebook + beta * commit: beta weighs the encoder's commitment."""
    return codebook + beta * commit


class VQGAN(nn.Module):
    """Encoder 28 -> 14 -> 7, vector quantiser, decoder 7 -> 14 -> 28."""

    def __init__(self, K=256, D=32, width=32):
        super().__init__()
        c1, c2 = width, 2 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, 2, 1),                                   # (B, c1, 14, 14)
            ResBlock(c1, c1),
            nn.Conv2d(c1, c2, 4, 2, 1),                                  # (B, c2, 7, 7)
            ResBlock(c2, c2), ResBlock(c2, c2),
            nn.GroupNorm(8, c2), nn.SiLU(), nn.Conv2d(c2, D, 1))         # (B, D, 7, 7)
        self.quantizer = VectorQuantizer(K, D)
        self.decoder = nn.Sequential(
            nn.Conv2d(D, c2, 3, 1, 1),                                   # (B, c2, 7, 7)
            ResBlock(c2, c2), ResBlock(c2, c2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c2, c1, 3, 1, 1),                                  # (B, c1, 14, 14)
            ResBlock(c1, c1),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.GroupNorm(8, c1), nn.SiLU(),
            nn.Conv2d(c1, 1, 3, 1, 1))                                   # (B, 1, 28, 28)
        # Linear output (no tanh): L1's gradient is sign(x_hat - x), which a
        # saturating tanh would kill; images are clamped only when shown or scored.

    @property
    def last_layer(self):
        """G_L, the weight at which the adaptive GAN weight compares gradients."""
        return self.decoder[-1].weight

    def encode(self, x):
        return self.quantizer(self.encoder(x))

    def decode_indices(self, indices):
        """Images (B, 1, 28, 28) in [-1, 1] (unclamped) from token grids (B, 7, 7)."""
        z_q = self.quantizer.codebook(indices).permute(0, 3, 1, 2)      # (B, D, 7, 7)
        return self.decoder(z_q)

    def forward(self, x):
        z_e = self.encoder(x)                                           # (B, D, 7, 7)
        z_q, indices, codebook, commit = self.quantizer(z_e)
        return self.decoder(z_q), z_e, indices, codebook, commit


class PatchDiscriminator(nn.Module):
    """PatchGAN: a 7 x 7 grid of logits, each with an 18 x 18 receptive field.

    Returns (logits (B, 1, 7, 7), [hidden features]); the features feed the
    feature-matching perceptual term."""

    def __init__(self, width=32):
        super().__init__()
        # No normalisation layer: GroupNorm (or BatchNorm) pools statistics over
        # the whole image, and every logit would then depend on every pixel.
        self.block1 = nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2))  # rf 4
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 4, 2, 1),              # rf 10
                                    nn.LeakyReLU(0.2))                                  # (B, 2w, 7, 7)
        self.head = nn.Conv2d(2 * width, 1, 3, 1, 1)                                   # rf 18

    def forward(self, x):
        f1 = self.block1(x)
        f2 = self.block2(f1)
        return self.head(f2), [f1, f2]


# ----------------------------------------------------------------------------- stage one: objective

def hinge_d_loss(logits_real, logits_fake):
    """L_D = mean relu(1 - D(x)) + mean relu(1 + D(x_hat))."""
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def hinge_g_loss(logits_fake):
    """L_GAN = -mean D(x_hat): the generator raises the fake logits."""
    return -logits_fake.mean()


def feature_matching(feats_real, feats_fake):
    """L_perc = mean over D's hidden layers of mean |f(x) - f(x_hat)|."""
    return sum((r.detach() - f).abs().mean() for r, f in zip(feats_real, feats_fake)) / len(feats_real)


def adaptive_weight(rec_loss, gan_loss, last_layer, max_weight=1e4):
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped, no gradient."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    lam = g_rec.norm() / (g_gan.norm() + 1e-4)
    return lam.clamp(0.0, max_weight).detach()


def generator_loss(model, disc, x, step, args):
    """Every term of the tokenizer's loss, returned separately, and their total.

    The GAN term joins the total only when step >= args.disc_start (and not with
    --no-gan); before that it is not in the graph at all, so it adds exactly nothing."""
    x_hat, z_e, indices, codebook, commit = model(x)
    terms = {"l1": (x_hat - x).abs().mean(), "codebook": codebook, "commit": commit}
    rec = terms["l1"]
    use_gan = args.gan and step >= args.disc_start
    if args.perceptual or use_gan:
        logits_fake, feats_fake = disc(x_hat)
    if args.perceptual:
        with torch.no_grad():
            _, feats_real = disc(x)
        terms["perc"] = feature_matching(feats_real, feats_fake)
        rec = rec + args.perceptual_weight * terms["perc"]
    total = rec + vq_loss(codebook, commit, args.beta)
    if use_gan:
        terms["gan"] = hinge_g_loss(logits_fake)
        terms["lambda"] = adaptive_weight(rec, terms["gan"], model.last_layer, args.max_lambda)
        total = total + args.disc_weight * terms["lambda"] * terms["gan"]
    terms["total"] = total
    return terms, x_hat, z_e


def generator_step(model, disc, opt_g, x, step, args):
    """One optimizer step of encoder, codebook and decoder; D's weights are frozen
    (requires_grad off), so the step cannot touch them."""
    disc.requires_grad_(False)
    terms, x_hat, z_e = generator_loss(model, disc, x, step, args)
    check_finite(step, **{k: v.detach() for k, v in terms.items()})
    opt_g.zero_grad(set_to_none=True)
    terms["total"].backward()
    opt_g.step()
    disc.requires_grad_(True)
    return terms, x_hat.detach(), z_e


def discriminator_step(disc, opt_d, x, x_hat):
    """One hinge step of D on real x and *detached* reconstructions."""
    logits_real, _ = disc(x)
    logits_fake, _ = disc(x_hat.detach())
    loss = hinge_d_loss(logits_real, logits_fake)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return loss


# ----------------------------------------------------------------------------- stage two: prior

class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + mask) V over n_head heads, written out."""

    def __init__(self, E, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(E, 3 * E)
        self.proj = nn.Linear(E, E)

    def forward(self, h):
        B, T, E = h.shape
        q, k, v = self.qkv(h).split(E, dim=2)
        # (B, T, E) -> (B, heads, T, E / heads)
        q, k, v = (t.view(B, T, self.n_head, E // self.n_head).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(E // self.n_head)  # (B, heads, T, T)
        # Position t may look at positions <= t only: future scores become -inf,
        # so their softmax weight, and every gradient through them, is exactly 0.
        future = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        att = scores.masked_fill(future, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, E)                  # (B, T, E)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, E, n_head):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = CausalSelfAttention(E, n_head)
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E))

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class Prior(nn.Module):
    """Causal transformer over [class, k_1, ..., k_{T-1}] predicting k_1 .. k_T.

    One embedding table: ids 0..K-1 are codes, K + c is the label of class c."""

    def __init__(self, K, T=49, E=128, n_layer=4, n_head=4, n_classes=10):
        super().__init__()
        self.K, self.T = K, T
        self.tok_emb = nn.Embedding(K + n_classes, E)
        self.pos_emb = nn.Parameter(torch.zeros(T, E))
        self.blocks = nn.Sequential(*[Block(E, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(E)
        self.head = nn.Linear(E, K)
        nn.init.normal_(self.pos_emb, std=0.02)

    def embed(self, labels, tokens):
        """labels (B,), tokens (B, t) with t < T -> input embeddings (B, t + 1, E)."""
        ids = torch.cat([self.K + labels[:, None], tokens], 1)
        return self.tok_emb(ids) + self.pos_emb[:ids.shape[1]]

    def forward_embeddings(self, h):
        """Logits (B, t, K); position i predicts code k_{i+1} from inputs 0..i."""
        return self.head(self.ln_f(self.blocks(h)))

    def forward(self, labels, tokens):
        return self.forward_embeddings(self.embed(labels, tokens))


def prior_nll(prior, labels, tokens):
    """Per-token cross-entropy (nats) of tokens (B, T) under p(k_t | c, k_<t)."""
    logits = prior(labels, tokens[:, :-1])                              # (B, T, K)
    return F.cross_entropy(logits.reshape(-1, prior.K), tokens.reshape(-1))


def sample_top_k(logits, temperature=1.0, top_k=0, generator=None):
    """Draw one id per row from softmax(logits / temperature) restricted to the top k."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                 # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_tokens(prior, labels, temperature, top_k, seed=0):
    """Autoregressive sampling of (B, T) token grids (flattened) for the given classes."""
    prior.eval()
    device = labels.device
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.zeros(len(labels), 0, dtype=torch.long, device=device)
    for _ in range(prior.T):
        logits = prior(labels, tokens)[:, -1]                           # (B, K)
        nxt = sample_top_k(logits, temperature, top_k, gen)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
    return tokens


# ----------------------------------------------------------------------------- train / evaluate

def batches(n, batch_size, total):
    """Yield (step, index batch) for `total` steps over shuffled epochs."""
    batch_size = min(batch_size, n)  # a tiny data set still gives one batch per epoch
    step = 0
    while True:
        order = torch.randperm(n)
        for i in range(n // batch_size):
            if step == total:
                return
            step += 1
            yield step, order[i * batch_size:(i + 1) * batch_size]


def train_tokenizer(model, disc, x_train, args, device):
    opt_g = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9))
    total = args.tok_steps
    progress = Progress(total, label="tokenizer")
    model.train()
    disc.train()
    restarted = 0
    for step, idx in batches(len(x_train), args.batch_size, total):
        x = x_train[idx].to(device)
        terms, x_hat, z_e = generator_step(model, disc, opt_g, x, step - 1, args)
        if args.perceptual or args.gan:
            terms["disc"] = discriminator_step(disc, opt_d, x, x_hat)
        if step % args.restart_every == 0:
            restarted += model.quantizer.restart_dead_codes(z_e)
        progress.update(step, len(x), **{k: v.item() for k, v in terms.items() if k != "total"})
    print(f"tokenizer: {restarted} dead codes restarted in all", flush=True)
    return total


@torch.no_grad()
def encode_all(model, x, device, batch_size=1000):
    """Token grids (N, 7, 7) of a whole split."""
    model.eval()
    return torch.cat([model.encode(x[i:i + batch_size].to(device))[1].cpu()
                      for i in range(0, len(x), batch_size)])


@torch.no_grad()
def evaluate_tokenizer(model, x, device, batch_size=1000):
    """Reconstruction error in [0, 1] pixel units, PSNR, and how the codebook is used:
    usage = fraction of the K codes chosen at least once on these images,
    perplexity = exp(entropy of the code frequencies) (K if all equally used)."""
    model.eval()
    K = model.quantizer.codebook.num_embeddings
    l1 = se = 0.0
    counts = torch.zeros(K)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        x_hat, _, indices, _, _ = model(xb)
        a, b = to_unit(x_hat), to_unit(xb)
        l1 += (a - b).abs().sum().item()
        se += (a - b).pow(2).sum().item()
        counts += torch.bincount(indices.flatten(), minlength=K).cpu().float()
    mse = se / x.numel()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"test_recon_l1": l1 / x.numel(), "test_mse": mse,
            "test_psnr_db": 10 * math.log10(1.0 / mse),
            "codebook_usage": (counts > 0).float().mean().item(),
            "codebook_perplexity": math.exp(entropy)}


def train_prior(prior, tokens, labels, args, device):
    opt = torch.optim.AdamW(prior.parameters(), lr=args.prior_lr, weight_decay=0.01)
    total = args.prior_steps
    progress = Progress(total, label="prior")
    prior.train()
    for step, idx in batches(len(tokens), args.prior_batch_size, total):
        # Linear warm-up over the first 100 steps, then cosine decay to 0.
        lr = args.prior_lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / total))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = prior_nll(prior, labels[idx].to(device), tokens[idx].to(device))
        check_finite(step, prior_nll=loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, len(idx), nll_bits_per_token=loss.item() / math.log(2))
    return total


@torch.no_grad()
def evaluate_prior(prior, tokens, labels, device, batch_size=500):
    """-log2 p(tokens | class), summed over the 49 tokens, averaged over images."""
    prior.eval()
    nats = 0.0
    for i in range(0, len(tokens), batch_size):
        t, c = tokens[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        nats += prior_nll(prior, c, t).item() * t.numel()
    return {"test_prior_nll_bits": nats / len(tokens) / math.log(2)}  # per image


def write_outputs(model, prior, x_test, args, device, out):
    # recon.png: rows of 16 test digits, each row followed by its reconstruction.
    with torch.no_grad():
        model.eval()
        cols = min(16, len(x_test))
        nrow = min(4, len(x_test) // cols)
        x = x_test[:nrow * cols]
        x_hat = model(x.to(device))[0].cpu()
    rows = torch.stack([to_unit(x).view(nrow, cols, 1, 28, 28),
                        to_unit(x_hat).view(nrow, cols, 1, 28, 28)], 1)
    write_png(out / "recon.png", image_grid(rows.reshape(-1, 1, 28, 28), ncol=cols))
    if prior is None:
        return
    # samples: classes 0..9 in equal shares, in order, so each row is one class.
    n = args.num_samples
    labels = (torch.arange(n) * 10 // n).to(device)
    tokens = sample_tokens(prior, labels, args.temperature, args.top_k, seed=args.seed)
    with torch.no_grad():
        samples = to_unit(model.decode_indices(tokens.view(n, 7, 7))).cpu()
    atomic_write(out / "samples.npy", lambda f: np.save(f, samples.numpy()))  # (N, 1, 28, 28) in [0, 1]
    write_png(out / "samples.png", image_grid(samples, ncol=-(-n // 10)))


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE / "data" / "mnist"),
                   help="folder with the four MNIST idx .gz files (downloaded if missing)")
    p.add_argument("--out", default=f"runs/{SCRIPT}", help="output folder")
    p.add_argument("--steps", type=int, default=0,
                   help="cap on the optimizer steps of each stage (0: no cap)")
    p.add_argument("--tok-steps", type=int, default=2000, help="tokenizer (stage one) steps")
    p.add_argument("--prior-steps", type=int, default=1500,
                   help="transformer (stage two) steps; 0: train the tokenizer only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="tokenizer learning rate")
    p.add_argument("--disc-lr", type=float, default=5e-4)
    p.add_argument("--K", type=int, default=256, help="codebook size")
    p.add_argument("--code-dim", type=int, default=32, help="D, size of a code vector")
    p.add_argument("--width", type=int, default=32, help="channels at 14 x 14 (twice that at 7 x 7)")
    p.add_argument("--beta", type=float, default=0.25, help="weight of the commitment term")
    p.add_argument("--restart-every", type=int, default=100,
                   help="restart codes unused in this many steps")
    p.add_argument("--disc-start", type=int, default=800,
                   help="step at which lambda * L_GAN joins the generator loss")
    p.add_argument("--max-lambda", type=float, default=1e4, help="clamp of the adaptive weight")
    p.add_argument("--disc-weight", type=float, default=0.2,
                   help="w_d, constant factor on the adaptive weight lambda")
    p.add_argument("--no-gan", dest="gan", action="store_false",
                   help="drop lambda * L_GAN from the generator loss (the ablation)")
    p.add_argument("--no-perceptual", dest="perceptual", action="store_false",
                   help="drop the feature-matching perceptual term")
    p.add_argument("--perceptual-weight", type=float, default=1.0)
    p.add_argument("--prior-batch-size", type=int, default=128)
    p.add_argument("--prior-lr", type=float, default=1e-3)
    p.add_argument("--prior-width", type=int, default=128, help="E, transformer width")
    p.add_argument("--prior-layers", type=int, default=4)
    p.add_argument("--prior-heads", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=32, help="sample among the k likeliest codes (0: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=100, help="spread evenly over the 10 classes")
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on the first N test images only (0: all 10,000)")
    p.add_argument("--sample-only", action="store_true",
                   help="skip training: load --ckpt, evaluate and sample")
    p.add_argument("--ckpt", help="checkpoint to load with --sample-only")
    args = p.parse_args(argv)
    if args.sample_only and not args.ckpt:
        p.error("--sample-only needs --ckpt PATH")
    for flag in ("tok_steps", "batch_size", "K", "code_dim", "restart_every", "prior_batch_size",
                 "prior_width", "prior_layers", "prior_heads", "num_samples"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.width % 8 or args.prior_width % args.prior_heads:
        p.error("--width must be a multiple of 8 and --prior-width of --prior-heads")
    if min(args.steps, args.test_limit, args.prior_steps, args.disc_start) < 0:
        p.error("--steps, --prior-steps, --disc-start and --test-limit must be >= 0")
    if args.temperature <= 0:
        p.error("--temperature must be positive")
    if args.steps:
        args.tok_steps = min(args.tok_steps, args.steps)
        args.prior_steps = min(args.prior_steps, args.steps)
    return args


def build(cfg, device):
    model = VQGAN(cfg["K"], cfg["code_dim"], cfg["width"]).to(device)
    disc = PatchDiscriminator(cfg["width"]).to(device)
    prior = Prior(cfg["K"], 49, cfg["prior_width"], cfg["prior_layers"], cfg["prior_heads"]).to(device)
    return model, disc, prior


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_test, y_test = mnist_tensors(args.data_dir, "test")
    x_test, y_test = x_test[:args.test_limit or None], y_test[:args.test_limit or None]
    if args.sample_only:
        ckpt = load_checkpoint(args.ckpt)
        cfg = ckpt["config"]
        try:
            model, disc, prior = build(cfg, device)
            model.load_state_dict(ckpt["model"]["tokenizer"])
            disc.load_state_dict(ckpt["model"]["disc"])
            if "prior" in ckpt["model"]:
                prior.load_state_dict(ckpt["model"]["prior"])
            else:
                prior = None
        except (KeyError, RuntimeError, TypeError) as e:
            raise RunError(f"{args.ckpt} does not hold this script's weights ({type(e).__name__})") from None
        steps = {"tok": 0, "prior": 0}
        train_seconds = 0.0
    else:
        x_train, y_train = mnist_tensors(args.data_dir, "train")
        model, disc, prior = build(vars(args), device)
        start = time.time()
        steps = {"tok": train_tokenizer(model, disc, x_train, args, device)}
        state = {"tokenizer": model.state_dict(), "disc": disc.state_dict()}
        if args.prior_steps:
            tokens = encode_all(model, x_train, device).flatten(1)      # (N, 49)
            steps["prior"] = train_prior(prior, tokens, y_train, args, device)
            state["prior"] = prior.state_dict()
        else:
            prior, steps["prior"] = None, 0
        train_seconds = time.time() - start
        save_checkpoint(out / "model.pt", state, vars(args))
    metrics = evaluate_tokenizer(model, x_test, device)
    if prior is not None:
        metrics.update(evaluate_prior(prior, encode_all(model, x_test, device).flatten(1),
                                      y_test, device))
    write_outputs(model, prior, x_test, args, device, out)
    metrics.update(train_seconds=round(train_seconds, 1), steps=steps["tok"] + steps["prior"],
                   tokenizer_steps=steps["tok"], prior_steps=steps["prior"], device=str(device),
                   test_images=len(x_test))
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
