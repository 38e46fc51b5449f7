"""VQ-VAE on MNIST: discrete tokens, straight-through gradients, no dead codes, and a prior.

An encoder maps an image x (1 x 28 x 28) to a grid z_e of h x w = 7 x 7 vectors of
dimension D. Each vector is replaced by its nearest entry of a learned codebook
{e_1 .. e_K},

    q(z) = e_k,  k = argmin_j ||z - e_j||,

so the image becomes 49 tokens in {1..K}; a decoder maps the quantised grid z_q
back to pixels. q is piecewise constant (zero gradient almost everywhere), so the
encoder is trained with the straight-through estimator, which takes dq/dz = I:

    z_q = z_e + sg[q(z_e) - z_e]        (value q(z_e), gradient that of z_e)

The loss of van den Oord et al. (2017), sg = stop-gradient, means over elements:

    L = ||x - x_hat||^2  +  ||sg[z_e] - e||^2  +  beta * ||z_e - sg[e]||^2
        recon               codebook term         commitment term (beta = 0.25)

The codebook term moves only the codes, the commitment term only the encoder.
With --codebook ema (default) the codes are not learned by gradient but set to
exponential moving averages of the encoder outputs assigned to them (decay 0.99,
Laplace-smoothed counts), and the codebook term drops out of the loss. A code
that no encoder output picked for --dead-after steps is restarted on a random
encoder output of the current batch, so all K codes stay in use (--no-restart
turns this off, to see what it buys).

Stage two fits an autoregressive prior p(z | y) = prod_t p(z_t | z_<t, y) over
the 49 tokens in raster order (a small causal transformer, conditioned on the
digit label y), samples tokens, and decodes them. Its test NLL is the rate of
this lossy code, to set beside the naive h*w*log2 K = 49 * 9 = 441 bits.

Why EMA by default: with the restart on, both ways reached the same test MSE
(0.0030) and full usage in 1404 CPU steps, a tie; EMA is kept because it has no
codebook learning rate to tune (each code jumps to the mean of its cluster) and
is the variant the paper's appendix reports converging faster. Both modes share
the restart; the README has the numbers.

Shape legend: B batch, C channels, H W image height width, h w token grid,
D code dim, K codebook size, T token sequence length (h*w), E prior width.

Run:   python vqvae.py                       (both stages, 6.5 minutes on a 2-core CPU)
       python vqvae.py --no-restart --no-prior        (stage one only, dead codes allowed)
       python vqvae.py --codebook loss                (codebook learned by its loss term)
       python vqvae.py --sample-only --ckpt runs/vqvae/model.pt
Writes runs/vqvae/: samples.png (one row per digit class), samples.npy,
recon.png, model.pt, metrics.json (test_recon_mse, codebook_usage,
codebook_perplexity, test_prior_nll_bits, naive_rate_bits, ...).
The default run reached test MSE 0.0026, all 512 codes used on the test set
(perplexity 314), and a prior NLL of 167 bits per image given the label (at most
log2 10 = 3.3 bits more without it) against the naive 441. With --no-restart,
same length: 108 of 512 codes used (perplexity 52), test MSE 0.0033.

Reference: van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation
Learning" (NeurIPS 2017), incl. its appendix on EMA codebook updates.
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

SCRIPT = "vqvae"
HERE = Path(__file__).resolve().parent
NUM_CLASSES = 10


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
    """Images as float (N, 1, 28, 28) in [0, 1], and labels (N,)."""
    images, labels = load_mnist(data_dir, split)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels)


# ----------------------------------------------------------------------------- model: stage one

class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): depth at 7 x 7 without losing the identity path."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x):
        return x + self.body(x)


class VectorQuantizer(nn.Module):
    """The codebook {e_1..e_K} (K, D) and the nearest-code lookup.

    The codebook is a Parameter in both modes so that model.pt looks the same;
    with EMA it has requires_grad=False and is written by ema_update()."""

    def __init__(self, K=512, D=16, ema=True, decay=0.99, eps=1e-5):
        super().__init__()
        self.K, self.D, self.ema, self.decay, self.eps = K, D, ema, decay, eps
        # Codes start in a tiny ball around 0 (a common default): almost all of
        # them lose every argmin at first, which is what the restart is for.
        self.codebook = nn.Parameter(torch.empty(K, D).uniform_(-1 / K, 1 / K), requires_grad=not ema)
        # EMA state: count N_k and sum m_k, started at (1, e_k) so m_k / N_k = e_k.
        self.register_buffer("ema_count", torch.ones(K))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        # The training step at which each code last won an argmin (for the restart).
        self.register_buffer("last_used", torch.zeros(K, dtype=torch.long))

    @torch.no_grad()
    def nearest(self, z_flat, rows=1024):
        """k = argmin_j ||z - e_j||^2 = argmin_j (||e_j||^2 - 2 z.e_j); ties -> lowest j.

        ||z||^2 is the same for every j and is dropped. The (N, K) distance table is
        built `rows` latents at a time, one addmm each: at K = 65,536 a whole batch's
        table is 1.6 GB, and building it in one piece is 3.5x slower."""
        e = self.codebook
        e2 = e.pow(2).sum(1)  # (K,)
        return torch.cat([torch.addmm(e2, z_flat[i:i + rows], e.t(), alpha=-2).argmin(1)
                          for i in range(0, len(z_flat), rows)])

    def forward(self, z_e):
        """z_e (B, D, h, w) -> the chosen codes e = q(z_e) (B, D, h, w) and tokens (B, h, w)."""
        B, D, h, w = z_e.shape
        z_flat = z_e.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        codes = self.nearest(z_flat.detach())
        e = self.codebook[codes].view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return e, codes.view(B, h, w)

    def lookup(self, tokens):
        """Tokens (B, h, w) -> code vectors (B, D, h, w)."""
        return self.codebook[tokens].permute(0, 3, 1, 2)

    @torch.no_grad()
    def mark_used(self, codes, step):
        self.last_used[codes.flatten().unique()] = step

    @torch.no_grad()
    def ema_update(self, z_flat, codes):
        """Appendix of van den Oord et al. 2017, with Laplace smoothing of the counts:

            N_k <- decay N_k + (1 - decay) n_k          n_k = #{i : code(i) = k}
            m_k <- decay m_k + (1 - decay) sum_{i: code(i) = k} z_i
            N~_k = (N_k + eps) / (n + K eps) * n        n = sum_k N_k
            e_k  = m_k / N~_k
        The smoothing keeps N~_k > 0 for a code that nobody picks."""
        codes = codes.flatten()
        n_k = torch.bincount(codes, minlength=self.K).type_as(z_flat)              # (K,)
        sum_k = torch.zeros_like(self.ema_sum).index_add_(0, codes, z_flat)        # (K, D)
        self.ema_count.mul_(self.decay).add_(n_k, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sum_k, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.K * self.eps) * n
        self.codebook.data.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, z_flat, step, dead_after):
        """Codes unused for `dead_after` steps jump onto random rows of z_flat (recent
        encoder outputs). There they win at least the output they copy, so they
        are used again and then follow their new cluster. Returns how many."""
        dead = torch.nonzero(step - self.last_used >= dead_after).flatten()
        if len(dead) == 0:
            return 0
        pick = torch.randint(len(z_flat), (len(dead),), device=z_flat.device)
        self.codebook.data[dead] = z_flat[pick]
        self.ema_sum[dead] = z_flat[pick]  # so that m_k / N_k = the new e_k
        self.ema_count[dead] = 1.0
        self.last_used[dead] = step
        return len(dead)


def straight_through(z_e, e):
    """z_q = z_e + sg[e - z_e]: forward value e, backward dL/dz_e = dL/dz_q exactly."""
    return z_e + (e - z_e).detach()


class VQVAE(nn.Module):
    """Encoder 28 -> 14 -> 7, quantiser, and a decoder 7 -> 14 -> 28."""

    def __init__(self, K=512, D=16, width=64, ema=True, decay=0.99):
        super().__init__()
        c1, c2 = width // 2, width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, 2, 1), nn.ReLU(),            # (B, c1, 14, 14)
            nn.Conv2d(c1, c2, 4, 2, 1),                       # (B, c2, 7, 7)
            ResBlock(c2), nn.ReLU(),
            nn.Conv2d(c2, D, 1),                              # (B, D, 7, 7) = z_e
        )
        self.quantizer = VectorQuantizer(K, D, ema, decay)
        self.decoder = nn.Sequential(
            nn.Conv2d(D, c2, 3, 1, 1),                        # (B, c2, 7, 7)
            ResBlock(c2), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),   # (B, c1, 14, 14)
            nn.ConvTranspose2d(c1, 1, 4, 2, 1),               # (B, 1, 28, 28)
        )
        # Linear output (no sigmoid): the MSE gradient stays alive at black and
        # white pixels; images are clamped to [0, 1] only when scored or shown.

    def forward(self, x):
        z_e = self.encoder(x)              # (B, D, h, w)
        e, codes = self.quantizer(z_e)     # (B, D, h, w), (B, h, w)
        z_q = straight_through(z_e, e)
        return self.decoder(z_q), z_e, e, codes

    def decode_tokens(self, tokens):
        """Tokens (B, h, w) -> images (B, 1, 28, 28) in [0, 1]."""
        return self.decoder(self.quantizer.lookup(tokens)).clamp(0, 1)


# ----------------------------------------------------------------------------- model: stage two

# --- shared: token prior ---
# Stage two of the VQ family (vqvae.py, vqgan.py, lfq.py): an autoregressive prior over
# the T = h*w tokens of an image in raster order, conditioned on its label y,
#     p(z | y) = prod_t p(z_t | z_<t, y),   fitted by next-token cross-entropy,
# a small causal transformer with its attention written out. Label num_classes means
# "no label": an unconditional prior is trained and sampled with that label only.

class CausalBlock(nn.Module):
    """Pre-norm transformer block: h + attn(LN(h)), then h + MLP(LN(h)).

    attn = softmax(Q K^T / sqrt(d) + mask) V over `heads` heads of size d = width / heads,
    where the mask lets position t attend to positions <= t only."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h):
        B, T, E = h.shape
        d = E // self.heads
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)                 # (B, heads, T, T)
        # -inf before the softmax gives future positions weight exactly 0, and so
        # exactly zero gradient: this line is the whole of causality.
        future = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
        att = scores.masked_fill(future, float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(B, T, E))      # (B, T, E)
        return h + self.mlp(self.ln2(h))


class TokenPrior(nn.Module):
    """prior(tokens, labels) -> logits: tokens (B, t), 1 <= t <= T, labels (B,) -> (B, t, K).

    Input position 0 holds a start vector for the label y, input position s > 0 the
    embedding of token z_{s-1}; so output t sees y and z_<t only, and its logits
    predict z_t. The last input token is never read."""

    def __init__(self, codebook_size, seq_len, num_classes=10, width=128, layers=3, heads=4):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.codebook_size, self.seq_len, self.num_classes = codebook_size, seq_len, num_classes
        self.tok_emb = nn.Embedding(codebook_size, width)
        self.start_emb = nn.Embedding(num_classes + 1, width)  # row num_classes: "no label"
        self.pos_emb = nn.Parameter(0.02 * torch.randn(seq_len, width))
        self.blocks = nn.ModuleList(CausalBlock(width, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, codebook_size)

    def forward(self, tokens, labels):
        h = torch.cat([self.start_emb(labels)[:, None], self.tok_emb(tokens[:, :-1])], 1)
        h = h + self.pos_emb[:h.shape[1]]                                  # (B, t, E)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))                                     # (B, t, K)


def prior_nll(prior, tokens, labels):
    """Mean negative log-likelihood per token in nats: -mean_{b,t} log p(z_t | z_<t, y)."""
    logits = prior(tokens, labels)                                         # (B, T, K)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def draw_token(logits, temperature=1.0, top_k=0, generator=None):
    """One token per row from softmax(logits / temperature), restricted to the top_k
    likeliest (0: all; ties with the k-th are kept): logits (B, K) -> tokens (B,)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                    # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_tokens(prior, labels, temperature=1.0, top_k=0, generator=None, prefix=None):
    """Ancestral sampling, z_t ~ p(z_t | z_<t, y) for t = 0..T-1: labels (B,) -> tokens (B, T).

    prefix (B, t0), if given, fixes z_0..z_{t0-1} and sampling continues from there.
    Step t runs the prior on z_0..z_t, where z_t is still a placeholder that output t
    cannot see, and draws z_t from output t. `generator` lives on labels' device."""
    if temperature <= 0 or top_k < 0:
        raise ValueError(f"need temperature > 0 and top_k >= 0 (got {temperature}, {top_k})")
    was_training = prior.training
    prior.eval()
    tokens = torch.zeros(len(labels), prior.seq_len, dtype=torch.long, device=labels.device)
    start = 0
    if prefix is not None:
        start = prefix.shape[1]
        tokens[:, :start] = prefix
    for t in range(start, prior.seq_len):
        logits = prior(tokens[:, :t + 1], labels)[:, t]                    # (B, K)
        tokens[:, t] = draw_token(logits, temperature, top_k, generator)
    prior.train(was_training)
    return tokens


def batches(n, batch_size, total, generator=None):
    """Index tensors of `total` mini-batches of range(n), reshuffled every epoch
    (an epoch's last incomplete batch is dropped)."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size {batch_size} needs 1 <= batch size <= {n} examples")
    step = 0
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(n // batch_size):
            if step == total:
                return
            yield order[i * batch_size:(i + 1) * batch_size]
            step += 1


def cosine_lr(step, total, warmup=0):
    """Learning-rate multiplier at step 0, 1, ..: linear warm-up (step + 1) / warmup for
    step < warmup, then 0.5 (1 + cos(pi (step - warmup) / (total - warmup))), from 1
    down to 0 at step = total. Use it as LambdaLR(opt, lambda s: cosine_lr(s, total))."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
# --- end shared ---


# ----------------------------------------------------------------------------- objective

def vq_loss_terms(z_e, e, beta=0.25):
    """The two VQ terms, each a mean over the N = B*D*h*w elements:

        codebook = ||sg[z_e] - e||^2 / N          (moves the codes, not the encoder)
        commit   = beta * ||z_e - sg[e]||^2 / N   (moves the encoder, not the codes)
    so d commit / d z_e = 2 beta (z_e - e) / N."""
    codebook = (z_e.detach() - e).pow(2).mean()
    commit = beta * (z_e - e.detach()).pow(2).mean()
    return codebook, commit


def vqvae_loss(model, x, beta=0.25):
    """recon, codebook, commit for a batch; also z_e and the tokens (for the codebook upkeep)."""
    x_hat, z_e, e, codes = model(x)
    recon = (x_hat - x).pow(2).mean()
    codebook, commit = vq_loss_terms(z_e, e, beta)
    return recon, codebook, commit, z_e, codes


def codebook_stats(counts):
    """usage = fraction of codes used; perplexity = exp(H(p)), p = counts / sum (0 log 0 = 0)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    p = counts / counts.sum()
    p = p[p > 0]
    return {"codebook_usage": (counts > 0).double().mean().item(),
            "codebook_perplexity": torch.exp(-(p * p.log()).sum()).item()}


# ----------------------------------------------------------------------------- train / evaluate / sample

def total_steps(n, args, epochs):
    per_epoch = max(1, n // args.batch_size)
    return min(epochs * per_epoch, args.steps) if args.steps else epochs * per_epoch


def train_vqvae(model, x_train, args, device):
    vq = model.quantizer
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    total = total_steps(len(x_train), args, args.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total))
    progress, restarted = Progress(total, label="vq"), 0
    model.train()
    for step, idx in enumerate(batches(len(x_train), args.batch_size, total), 1):
        xb = x_train[idx].to(device)
        recon, codebook, commit, z_e, codes = vqvae_loss(model, xb, args.beta)
        # With EMA the codebook term has no gradient path (the codes are not
        # learned by gradient), so it is left out of the loss and only logged.
        loss = recon + commit + (0 if vq.ema else codebook)
        check_finite(step, recon=recon, commit=commit)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        z_flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, vq.D)  # (B*h*w, D)
        vq.mark_used(codes, step)
        if vq.ema:
            vq.ema_update(z_flat, codes)
        if not args.no_restart:
            restarted += vq.restart_dead_codes(z_flat, step, args.dead_after)
        progress.update(step, len(xb), recon=recon.item(), codebook=codebook.item(),
                        commit=commit.item(), restarts=restarted)
    return total


@torch.no_grad()
def encode_tokens(model, x, device, batch_size=1000):
    """Tokens (N, h, w) of every image, and the per-pixel squared error of its reconstruction."""
    model.eval()
    tokens, se = [], 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        _, _, _, codes = model(xb)
        se += (model.decode_tokens(codes) - xb).pow(2).sum().item()
        tokens.append(codes.cpu())
    return torch.cat(tokens), se / max(1, x.numel())


@torch.no_grad()
def evaluate_vqvae(model, x_test, device):
    tokens, mse = encode_tokens(model, x_test, device)
    counts = torch.bincount(tokens.flatten(), minlength=model.quantizer.K)
    stats = codebook_stats(counts)
    return tokens, {"test_recon_mse": mse, **stats,
                    "codebook_used_codes": int((counts > 0).sum())}


def train_prior(prior, tokens, labels, args, device):
    opt = torch.optim.Adam(prior.parameters(), lr=args.prior_lr)
    total = total_steps(len(tokens), args, args.prior_epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup=min(100, total // 10)))
    progress = Progress(total, label="prior")
    prior.train()
    for step, idx in enumerate(batches(len(tokens), args.batch_size, total), 1):
        nll = prior_nll(prior, tokens[idx].to(device), labels[idx].to(device))
        check_finite(step, prior_nll=nll)
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
        sched.step()
        progress.update(step, len(idx), nll_bits_per_image=nll.item() * prior.seq_len / math.log(2))
    return total


@torch.no_grad()
def evaluate_prior(prior, tokens, labels, device, batch_size=1000):
    """Test NLL in bits per image: -sum_t log2 p(z_t | z_<t, y), averaged over images."""
    prior.eval()
    nats = 0.0
    for i in range(0, len(tokens), batch_size):
        tb, yb = tokens[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        nats += prior_nll(prior, tb, yb).item() * tb.numel()
    return nats / max(1, len(tokens)) / math.log(2)


def sample_labels(n, conditional, device):
    """One row of the grid per class: labels 0,0,..,1,1,.. in rows of ceil(n / 10)."""
    per_row = -(-n // NUM_CLASSES)
    if not conditional:
        return torch.full((n,), NUM_CLASSES, device=device), min(n, 16)
    return (torch.arange(n, device=device) // per_row).clamp(max=NUM_CLASSES - 1), per_row


def write_outputs(model, prior, x_test, args, device, out, h, w):
    # recon.png: rows of up to 16 test digits, each row followed by its reconstruction.
    x = x_test[:64]
    tokens, _ = encode_tokens(model, x, device)
    with torch.no_grad():
        x_hat = model.decode_tokens(tokens.to(device)).cpu()
    rows = []
    for i in range(0, len(x), 16):
        rows += [x[i:i + 16], x_hat[i:i + 16]]
    write_png(out / "recon.png", image_grid(torch.cat(rows), ncol=min(16, len(x))))
    if prior is None:
        return
    labels, ncol = sample_labels(args.num_samples, not args.unconditional, device)
    print(f"sampling {len(labels)} x {prior.seq_len} tokens", flush=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    z = sample_tokens(prior, labels, args.temperature, args.top_k, gen).view(-1, h, w)
    with torch.no_grad():
        samples = model.decode_tokens(z).cpu()
    atomic_write(out / "samples.npy", lambda f: np.save(f, samples.numpy()))  # (N, 1, 28, 28) in [0, 1]
    write_png(out / "samples.png", image_grid(samples, ncol=ncol))


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE / "data" / "mnist"),
                   help="folder with the four MNIST idx .gz files (downloaded if missing)")
    p.add_argument("--out", default=f"runs/{SCRIPT}", help="output folder")
    p.add_argument("--epochs", type=int, default=5, help="stage one (VQ-VAE) epochs")
    p.add_argument("--prior-epochs", type=int, default=4, help="stage two (prior) epochs")
    p.add_argument("--steps", type=int, default=0,
                   help="cap on optimizer steps of each stage (0: no cap)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="stage one learning rate")
    p.add_argument("--prior-lr", type=float, default=1e-3)
    p.add_argument("--codebook-size", type=int, default=512, help="K, number of codes")
    p.add_argument("--code-dim", type=int, default=16, help="D, dimension of a code")
    p.add_argument("--width", type=int, default=64, help="channels at 7 x 7")
    p.add_argument("--beta", type=float, default=0.25, help="weight of the commitment term")
    p.add_argument("--codebook", choices=["ema", "loss"], default="ema",
                   help="learn the codes by EMA of their encoder outputs, or by the codebook loss")
    p.add_argument("--decay", type=float, default=0.99, help="EMA decay")
    p.add_argument("--no-restart", action="store_true", help="never restart dead codes")
    p.add_argument("--dead-after", type=int, default=20,
                   help="a code unused for this many steps is restarted")
    p.add_argument("--no-prior", action="store_true", help="stage one only (no samples)")
    p.add_argument("--prior-width", type=int, default=128, help="E, transformer width")
    p.add_argument("--prior-layers", type=int, default=3)
    p.add_argument("--prior-heads", type=int, default=4)
    p.add_argument("--unconditional", action="store_true", help="prior without the digit label")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest codes (0: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--test-limit", type=int, default=0,
                   help="evaluate on the first N test images only (0: all 10,000)")
    p.add_argument("--sample-only", action="store_true",
                   help="skip training: load --ckpt, evaluate and sample")
    p.add_argument("--ckpt", help="checkpoint to load with --sample-only")
    args = p.parse_args(argv)
    if args.sample_only and not args.ckpt:
        p.error("--sample-only needs --ckpt PATH")
    for flag in ("epochs", "prior_epochs", "batch_size", "codebook_size", "code_dim", "width",
                 "dead_after", "prior_width", "prior_layers", "prior_heads", "num_samples"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.steps < 0 or args.test_limit < 0 or args.top_k < 0:
        p.error("--steps, --test-limit and --top-k must be >= 0")
    if args.prior_width % args.prior_heads:
        p.error("--prior-width must be a multiple of --prior-heads")
    if not 0 < args.decay < 1 or args.temperature <= 0 or args.beta < 0:
        p.error("need 0 < --decay < 1, --temperature > 0 and --beta >= 0")
    return args


def build_models(cfg, device, with_prior):
    model = VQVAE(cfg["codebook_size"], cfg["code_dim"], cfg["width"],
                  cfg["codebook"] == "ema", cfg["decay"]).to(device)
    prior = None
    if with_prior:
        prior = TokenPrior(cfg["codebook_size"], 7 * 7, NUM_CLASSES, cfg["prior_width"],
                           cfg["prior_layers"], cfg["prior_heads"]).to(device)
    return model, prior


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_test, y_test = mnist_tensors(args.data_dir, "test")
    x_test, y_test = x_test[:args.test_limit or None], y_test[:args.test_limit or None]
    metrics = {}
    if args.sample_only:
        ckpt = load_checkpoint(args.ckpt)
        cfg = ckpt["config"]
        model, prior = build_models(cfg, device, "prior" in ckpt["model"])
        try:
            model.load_state_dict(ckpt["model"]["vqvae"])
            if prior is not None:
                prior.load_state_dict(ckpt["model"]["prior"])
        except (KeyError, RuntimeError) as e:
            raise RunError(f"{args.ckpt} does not match this vqvae.py ({type(e).__name__})") from None
        args.unconditional = cfg["unconditional"]
        steps = {"vq_steps": 0, "prior_steps": 0}
        seconds = {"vq_train_seconds": 0.0, "prior_train_seconds": 0.0}
    else:
        x_train, y_train = mnist_tensors(args.data_dir, "train")
        if args.batch_size > len(x_train):
            raise RunError(f"--batch-size {args.batch_size} is larger than the training set "
                           f"({len(x_train)} images)")
        model, prior = build_models(vars(args), device, not args.no_prior)
        start = time.time()
        steps = {"vq_steps": train_vqvae(model, x_train, args, device), "prior_steps": 0}
        seconds = {"vq_train_seconds": time.time() - start, "prior_train_seconds": 0.0}
        state = {"vqvae": model.state_dict()}
        save_checkpoint(out / "model.pt", state, vars(args))
        if prior is not None:
            start = time.time()
            print("encoding the training set into tokens", flush=True)
            train_tokens, _ = encode_tokens(model, x_train, device)
            y_prior = y_train if not args.unconditional else torch.full_like(y_train, NUM_CLASSES)
            steps["prior_steps"] = train_prior(prior, train_tokens.flatten(1), y_prior, args, device)
            seconds["prior_train_seconds"] = time.time() - start
            state["prior"] = prior.state_dict()
            save_checkpoint(out / "model.pt", state, vars(args))
    test_tokens, vq_metrics = evaluate_vqvae(model, x_test, device)
    h, w = test_tokens.shape[1:]
    metrics.update(vq_metrics)
    metrics["naive_rate_bits"] = h * w * math.log2(model.quantizer.K)
    if prior is not None:
        y_eval = y_test if not args.unconditional else torch.full_like(y_test, NUM_CLASSES)
        metrics["test_prior_nll_bits"] = evaluate_prior(prior, test_tokens.flatten(1), y_eval, device)
        metrics["prior_conditional_on_label"] = not args.unconditional
    write_outputs(model, prior, x_test, args, device, out, h, w)
    metrics.update(train_seconds=round(sum(seconds.values()), 1),
                   **{k: round(v, 1) for k, v in seconds.items()},
                   steps=sum(steps.values()), **steps, device=str(device), test_images=len(x_test))
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
