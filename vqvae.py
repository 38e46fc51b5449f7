"""VQ-VAE: an image becomes a grid of discrete tokens, and a transformer prior writes new ones.

Stage one, the tokenizer. An encoder maps an image x (C x H x W; MNIST 1 x 28 x 28) to a grid
z_e of h x w = H/4 x W/4 vectors of dimension D. Each is replaced by its nearest codebook entry,
q(z) = e_k with k = argmin_j ||z - e_j||, so the image becomes h*w tokens in {0..K-1}, and a
decoder maps the quantised grid z_q back to pixels. q has zero gradient almost everywhere, so
the encoder learns through the straight-through estimator,

    z_q = z_e + sg[q(z_e) - z_e]        (value q(z_e), gradient that of z_e),

with the loss of van den Oord et al. (sg = stop-gradient, means over elements)

    L = ||x - x_hat||^2  +  ||sg[z_e] - e||^2  +  beta * ||z_e - sg[e]||^2
        recon               codebook term         commitment term (beta = 0.25)

The codebook term moves only the codes, the commitment term only the encoder. With --codebook
ema (default) the codes are moving averages of the encoder outputs assigned to them instead,
and the codebook term drops out. A code that no encoder output picked for --dead-after steps
restarts on one (0: never).

Stage two, the token prior p(z | y) = prod_t p(z_t | z_<t, y) over the h*w tokens in raster
order: a small causal transformer conditioned on the digit label y (none for unlabelled data;
the VQ family's shared block), fitted by next-token cross-entropy and sampled token by token.
Its test NLL is the rate of this lossy code, beside the naive h*w*log2 K bits.

Paper: van den Oord et al., "Neural Discrete Representation Learning" (NeurIPS 2017), with its
appendix on EMA codes. Shapes: B batch, C channels, H W image height width, h w token grid,
D code dim, K codebook size, T token sequence length (h*w), E prior width.

Run: python vqvae.py (MNIST, ~10 min on a 2-core CPU), or --data my_images.npy ((N, H, W) or
(N, C, H, W), H and W multiples of 4). A default run writes runs/vqvae/: model.pt, metrics.json
(test MSE 0.0026, all 512 codes used, prior 163 bits/image), samples.png/.npy (a row per digit),
sample_labels.npy, recon.png/.npy; --sample-only --ckpt runs/vqvae/model.pt samples again.
"""

import argparse, gzip, json, math, os, random, struct, sys, time, zlib  # the appendix needs most
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "vqvae"
DOWN = 4  # the encoder halves H and W twice: images need H, W multiples of 4


# ============================================================ the method, stage one: the tokenizer

class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): depth at h x w without losing the identity path."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x):
        return x + self.body(x)


class VectorQuantizer(nn.Module):
    """The codebook {e_1..e_K} (K, D) and the nearest-code lookup. The codebook is a Parameter in
    both modes (model.pt looks the same); with EMA it has no gradient and ema_update() writes it."""

    def __init__(self, K=512, D=16, ema=True, decay=0.99, eps=1e-5):
        super().__init__()
        self.K, self.D, self.ema, self.decay, self.eps = K, D, ema, decay, eps
        # Codes start in a tiny ball around 0: almost all lose every argmin at first (the restart's job).
        self.codebook = nn.Parameter(torch.empty(K, D).uniform_(-1 / K, 1 / K), requires_grad=not ema)
        # EMA state: count N_k and sum m_k, started at (1, e_k) so m_k / N_k = e_k.
        self.register_buffer("ema_count", torch.ones(K))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        # The training step at which each code last won an argmin (for the restart).
        self.register_buffer("last_used", torch.zeros(K, dtype=torch.long))

    @torch.no_grad()
    def nearest(self, z_flat, rows=1024):
        """k = argmin_j ||z - e_j||^2 = argmin_j (||e_j||^2 - 2 z.e_j); ties -> lowest j. ||z||^2
        is the same for every j and is dropped. The (N, K) distance table is built `rows`
        latents at a time, one addmm each: at K = 65,536 a whole batch's table is 1.6 GB."""
        e, e2 = self.codebook, self.codebook.pow(2).sum(1)  # (K, D), (K,)
        return torch.cat([torch.addmm(e2, z_flat[i:i + rows], e.t(), alpha=-2).argmin(1)
                          for i in range(0, len(z_flat), rows)])

    def forward(self, z_e):
        """z_e (B, D, h, w) -> the chosen codes e = q(z_e) (B, D, h, w) and tokens (B, h, w)."""
        B, D, h, w = z_e.shape
        z_flat = z_e.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        tokens = self.nearest(z_flat.detach())
        e = self.codebook[tokens].view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return e, tokens.view(B, h, w)

    @torch.no_grad()
    def ema_update(self, z_flat, tokens):
        """Appendix of van den Oord et al. 2017, with Laplace smoothing of the counts:

            N_k <- decay N_k + (1 - decay) n_k          n_k = #{i : token(i) = k}
            m_k <- decay m_k + (1 - decay) sum_{i: token(i) = k} z_i
            N~_k = (N_k + eps) / (n + K eps) * n        n = sum_k N_k
            e_k  = m_k / N~_k
        The smoothing keeps N~_k > 0 for a code that nobody picks."""
        tokens = tokens.flatten()
        n_k = torch.bincount(tokens, minlength=self.K).type_as(z_flat)             # (K,)
        sum_k = torch.zeros_like(self.ema_sum).index_add_(0, tokens, z_flat)       # (K, D)
        self.ema_count.mul_(self.decay).add_(n_k, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sum_k, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.K * self.eps) * n
        self.codebook.data.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, z_flat, step, dead_after):
        """Codes unused for `dead_after` steps jump onto random rows of z_flat (recent encoder
        outputs): there they win at least the output they copy, are used again and follow
        their new cluster. Returns how many."""
        dead = torch.nonzero(step - self.last_used >= dead_after).flatten()
        if len(dead):
            pick = torch.randint(len(z_flat), (len(dead),), device=z_flat.device)
            self.codebook.data[dead] = z_flat[pick]
            self.ema_sum[dead] = z_flat[pick]  # so that m_k / N_k = the new e_k
            self.ema_count[dead] = 1.0
            self.last_used[dead] = step
        return len(dead)

    def upkeep(self, z_e, tokens, step, dead_after):
        """After a step: mark the codes used, move them (EMA), restart dead ones (0: never); how many."""
        z_flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, self.D)  # (B*h*w, D)
        self.last_used[tokens.flatten()] = step
        if self.ema:
            self.ema_update(z_flat, tokens)
        return self.restart_dead_codes(z_flat, step, dead_after) if dead_after else 0


def straight_through(z_e, e):
    """z_q = z_e + sg[e - z_e]: forward value e, backward dL/dz_e = dL/dz_q exactly."""
    return z_e + (e - z_e).detach()


class VQVAE(nn.Module):
    """Encoder H x W -> H/2 -> H/4 = h, quantiser, and a decoder back to H x W."""

    def __init__(self, K=512, D=16, width=64, ema=True, decay=0.99, channels=1):
        super().__init__()
        c1, c2 = width // 2, width
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, c1, 4, 2, 1), nn.ReLU(),     # (B, c1, H/2, W/2)
            nn.Conv2d(c1, c2, 4, 2, 1),                       # (B, c2, h, w)
            ResBlock(c2), nn.ReLU(),
            nn.Conv2d(c2, D, 1),                              # (B, D, h, w) = z_e
        )
        self.quantizer = VectorQuantizer(K, D, ema, decay)
        self.decoder = nn.Sequential(
            nn.Conv2d(D, c2, 3, 1, 1),                        # (B, c2, h, w)
            ResBlock(c2), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),   # (B, c1, H/2, W/2)
            nn.ConvTranspose2d(c1, channels, 4, 2, 1),        # (B, C, H, W)
        )
        # Linear output (no sigmoid): the MSE gradient stays alive at black and
        # white pixels; images are clamped to [0, 1] only when scored or shown.

    def forward(self, x, beta=0.25):
        """x (B, C, H, W) -> x_hat (B, C, H, W), the loss terms {recon, codebook, commit}
        (scalars), and z_e (B, D, h, w) and tokens (B, h, w) for the codebook upkeep."""
        z_e = self.encoder(x)               # (B, D, h, w)
        e, tokens = self.quantizer(z_e)     # (B, D, h, w), (B, h, w)
        x_hat = self.decoder(straight_through(z_e, e))
        codebook, commit = vq_loss_terms(z_e, e, beta)
        return x_hat, {"recon": (x_hat - x).pow(2).mean(), "codebook": codebook, "commit": commit}, z_e, tokens

    def encode(self, x):
        """Images (B, C, H, W) -> tokens (B, h, w)."""
        return self.quantizer(self.encoder(x))[1]

    def decode_tokens(self, tokens):
        """Tokens (B, h, w) -> images (B, C, H, W) in [0, 1]."""
        e = self.quantizer.codebook[tokens].permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decoder(e).clamp(0, 1)


def vq_loss_terms(z_e, e, beta=0.25):
    """The two VQ terms, each a mean over the N = B*D*h*w elements:

        codebook = ||sg[z_e] - e||^2 / N          (moves the codes, not the encoder)
        commit   = beta * ||z_e - sg[e]||^2 / N   (moves the encoder, not the codes)
    so d commit / d z_e = 2 beta (z_e - e) / N."""
    codebook = (z_e.detach() - e).pow(2).mean()
    commit = beta * (z_e - e.detach()).pow(2).mean()
    return codebook, commit


def codebook_stats(counts):
    """usage = fraction of codes used; perplexity = exp(H(p)), p = counts / sum (0 log 0 = 0)."""
    p = torch.as_tensor(counts, dtype=torch.float64)
    p = p[p > 0] / p.sum()
    return {"codebook_usage": len(p) / len(counts), "codebook_perplexity": torch.exp(-(p * p.log()).sum()).item()}


# ============================================================ the method, stage two: the token prior

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


# ============================================================ the experiment

def train_vqvae(model, x_train, steps, batch_size, lr, beta, dead_after, device):
    """Stage one: Adam on the loss terms, a cosine learning rate, the codebook upkeep."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    progress, restarted = Progress(steps, label="vq"), 0
    model.train()
    for step, idx in enumerate(batches(len(x_train), batch_size, steps), 1):
        xb = x_train[idx].to(device)
        x_hat, terms, z_e, tokens = model(xb, beta)
        # With EMA the codes are not learnt by gradient: the codebook term is only logged.
        loss = terms["recon"] + terms["commit"] + (0 if model.quantizer.ema else terms["codebook"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        restarted += model.quantizer.upkeep(z_e, tokens, step, dead_after)
        progress(step, len(xb), **{k: v.detach() for k, v in terms.items()}, restarts=restarted)


def train_prior(prior, model, x_train, labels, steps, batch_size, lr, device):
    """Stage two: next-token cross-entropy on each batch's tokens, tokenised when the batch is drawn."""
    opt = torch.optim.Adam(prior.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup=min(100, steps // 10)))
    progress = Progress(steps, label="prior")
    model.eval()
    prior.train()
    for step, idx in enumerate(batches(len(x_train), batch_size, steps), 1):
        with torch.no_grad():
            tokens = model.encode(x_train[idx].to(device)).flatten(1)  # (B, T)
        nll = prior_nll(prior, tokens, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
        sched.step()
        progress(step, len(idx), nll_bits_per_image=nll.detach() * prior.seq_len / math.log(2))


@torch.no_grad()
def evaluate(model, prior, x_test, labels, device, batch_size=1000):
    """Reconstructions (N, C, H, W) in [0, 1] and the test metrics: MSE per pixel, codebook
    use, and the prior's NLL in bits per image, -sum_t log2 p(z_t | z_<t, y) averaged."""
    model.eval()
    recons, nats, counts = [], 0.0, torch.zeros(model.quantizer.K, dtype=torch.long)
    progress = Progress(len(x_test), label="test")
    for i in range(0, len(x_test), batch_size):
        tokens = model.encode(x_test[i:i + batch_size].to(device))  # (B, h, w)
        recons.append(model.decode_tokens(tokens).cpu())
        counts += torch.bincount(tokens.flatten().cpu(), minlength=model.quantizer.K)
        if prior is not None:  # prior_nll: a mean over the B*T tokens
            nll = prior_nll(prior.eval(), tokens.flatten(1), labels[i:i + batch_size].to(device))
            nats += nll.item() * tokens.numel()
        progress(i + len(tokens), len(tokens))
    recons, (h, w) = torch.cat(recons), tokens.shape[1:]
    metrics = {"test_recon_mse": (recons.double() - x_test.double()).pow(2).mean().item(), **codebook_stats(counts),
               "naive_rate_bits": h * w * math.log2(model.quantizer.K)}
    if prior is not None:
        metrics["test_prior_nll_bits"] = nats / len(x_test) / math.log(2)
    return recons, metrics


@torch.no_grad()
def evaluate_and_sample(args, models, classes, x_test, y_test, out, device):
    """Test metrics, recon.png (rows of test images over their reconstructions), recon.npy (the
    first 500); with a prior, samples.png/.npy and, one grid row per class, sample_labels.npy."""
    model, prior, n = models["vqvae"], getattr(models, "prior", None), args.num_samples
    y_test = y_test[:len(x_test)] if classes else torch.zeros(len(x_test), dtype=torch.long)
    recons, metrics = evaluate(model, prior, x_test, y_test, device)
    rows = [r for i in range(0, min(64, len(x_test)), 16) for r in (x_test[i:i + 16], recons[i:i + 16])]
    write_png(out / "recon.png", image_grid(torch.cat(rows), ncol=min(16, len(x_test))))
    np.save(out / "recon.npy", recons[:500].numpy())
    if prior is None:
        return metrics
    ncol = -(-n // classes) if classes else min(n, 16)
    labels = (torch.arange(n) // ncol).clamp(max=max(classes - 1, 0))  # 0,0,..,1,1,.. in rows; or all 0
    gen, start, tokens = torch.Generator(device=device).manual_seed(args.seed), time.time(), []
    progress, threads = Progress(n, label="sample"), torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices one token at a time: faster on 1 thread (measured)
    try:
        for i in range(0, n, 100):
            tokens.append(sample_tokens(prior, labels[i:i + 100].to(device), args.temperature, args.top_k, gen))
            progress(i + len(tokens[-1]), len(tokens[-1]))
    finally:
        torch.set_num_threads(threads)
    samples = model.decode_tokens(torch.cat(tokens).view(n, *[s // DOWN for s in x_test.shape[2:]])).cpu()
    np.save(out / "samples.npy", samples.numpy())
    write_png(out / "samples.png", image_grid(samples, ncol=ncol))
    if classes:
        np.save(out / "sample_labels.npy", labels.numpy())
    return {**metrics, "prior_conditional_on_label": bool(classes), "sample_seconds": round(time.time() - start, 1)}


# ============================================================ main

MODEL_FLAGS = ("codebook_size", "code_dim", "width", "codebook", "decay", "prior", "prior_width",
               "prior_layers", "prior_heads")  # the flags that shape the model: a checkpoint's config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--data", default="mnist", help="mnist, or a .npy of images (N, H, W) or (N, C, H, W); H, W multiples of 4")
    add("--data-dir", default=str(Path(__file__).parent / "data" / "mnist"), help="MNIST's folder")
    add("--out", help="output folder (None: runs/vqvae, or with --sample-only sample_only/ beside --ckpt)")
    add("--epochs", type=positive_int, default=5, help="stage one (VQ-VAE) epochs")
    add("--prior-epochs", type=positive_int, default=4, help="stage two (prior) epochs")
    add("--steps", type=nonnegative_int, default=0, help="cap on the optimizer steps of each stage (0: none)")
    add("--batch-size", type=positive_int, default=128, help="images per step, both stages")
    add("--lr", type=positive_float, default=2e-3, help="stage one learning rate")
    add("--prior-lr", type=positive_float, default=1e-3, help="stage two learning rate")
    add("--codebook-size", type=positive_int, default=512, help="K, number of codes")
    add("--code-dim", type=positive_int, default=16, help="D, dimension of a code")
    add("--width", type=checked(int, lambda v: v >= 2, ">= 2"), default=64, help="channels at h x w")
    add("--beta", type=checked(float, lambda v: v >= 0, ">= 0"), default=0.25, help="commitment term's weight")
    add("--codebook", choices=["ema", "loss"], default="ema", help="EMA of encoder outputs, or the codebook loss")
    add("--decay", type=fraction, default=0.99, help="EMA decay")
    add("--dead-after", type=nonnegative_int, default=20, help="restart codes unused this many steps (0: never)")
    add("--prior", action=argparse.BooleanOptionalAction, default=True, help="train stage two, and sample")
    add("--prior-width", type=positive_int, default=128, help="E, transformer width")
    add("--prior-layers", type=positive_int, default=3, help="transformer blocks")
    add("--prior-heads", type=positive_int, default=4, help="attention heads (dividing --prior-width)")
    add("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    add("--top-k", type=nonnegative_int, default=0, help="sample among the k likeliest codes (0: all)")
    add("--num-samples", type=positive_int, default=100, help="images to sample")
    add("--test-limit", type=nonnegative_int, default=0, help="evaluate on the first N test images (0: all)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto takes CUDA when present")
    add("--seed", type=nonnegative_int, default=0, help="seeds random, numpy and torch")
    add("--sample-only", action="store_true", help="load --ckpt, then only evaluate and sample")
    add("--ckpt", help="the model.pt that --sample-only loads")
    args = p.parse_args(argv)
    if args.prior_width % args.prior_heads:
        p.error("--prior-width must be a multiple of --prior-heads")
    given = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in MODEL_FLAGS
             if getattr(args, k) != p.get_default(k)]
    if args.sample_only and (given or not args.ckpt):
        p.error(f"--sample-only needs --ckpt and takes no flag that shapes the model ({', '.join(given)})")
    return args


def build(config):
    """The models a config describes: {"vqvae": VQVAE, "prior": TokenPrior (if trained)}."""
    c, (C, H, W) = config, config["image_shape"]
    models = nn.ModuleDict({"vqvae": VQVAE(c["codebook_size"], c["code_dim"], c["width"], c["codebook"] == "ema",
                                           c["decay"], C)})
    if c["prior"]:
        models["prior"] = TokenPrior(c["codebook_size"], (H // DOWN) * (W // DOWN), c["num_classes"],
                                     c["prior_width"], c["prior_layers"], c["prior_heads"])
    return models


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    x_test, y_test = load_images(args.data, args.data_dir, "test")
    x_test = x_test[:args.test_limit or None]
    C, H, W = shape = list(x_test.shape[1:])
    if H % DOWN or W % DOWN:
        raise RunError(f"--data {args.data}: {H} x {W} images; H and W must be multiples of {DOWN} (halved twice)")
    if args.sample_only:  # the models of --ckpt, into a folder that holds no training run
        models, config = load_checkpoint(args.ckpt, build)
        if config["image_shape"] != shape or (config["num_classes"] and y_test is None):
            raise RunError(f"{args.ckpt} was trained on other images than --data {args.data} ({shape})")
        out, log = Path(args.out or Path(args.ckpt).parent / "sample_only"), {"train_seconds": 0, "steps": 0}
        if (out / "model.pt").exists():
            raise RunError(f"--out {out} holds a training run's model.pt; give --sample-only another folder")
        out.mkdir(parents=True, exist_ok=True)
    else:
        x_train, y_train = load_images(args.data, args.data_dir, "train")
        n, B = len(x_train), args.batch_size
        if B > n:
            raise RunError(f"--batch-size {B} is larger than the training set ({n} images)")
        classes = 0 if y_train is None else int(y_train.max()) + 1  # 0: unlabelled, an unconditional prior
        config = {"image_shape": shape, "num_classes": classes, **{k: getattr(args, k) for k in MODEL_FLAGS}}
        out = Path(args.out or f"runs/{SCRIPT}")
        out.mkdir(parents=True, exist_ok=True)
        models, start = build(config).to(device), time.time()
        steps = [min(e * (n // B), args.steps or math.inf) for e in (args.epochs, args.prior_epochs * args.prior)]
        train_vqvae(models["vqvae"], x_train, steps[0], B, args.lr, args.beta, args.dead_after, device)
        if args.prior:  # an unconditional prior reads label num_classes = 0, "no label", for every image
            labels = y_train if classes else torch.zeros(n, dtype=torch.long)
            train_prior(models["prior"], models["vqvae"], x_train, labels, steps[1], B, args.prior_lr, device)
        log = {"steps": sum(steps), "train_seconds": round(time.time() - start, 1)}
        save_checkpoint(out / "model.pt", config, models.state_dict())
    metrics = evaluate_and_sample(args, models.to(device), config["num_classes"], x_test, y_test, out, device)
    metrics.update(**log, device=str(device), test_images=len(x_test))
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (RunError, OSError) as e:
        sys.exit(f"error: {e}")


# ============================================================ appendix: the plumbing every script repeats

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
