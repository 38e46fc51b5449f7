"""VQGAN on MNIST: a vector-quantised tokenizer trained with a patch GAN, and a
small causal transformer that writes digits with its tokens.

Stage one, the tokenizer. An encoder maps an image x to a grid of vectors z_e (7 x 7;
4 x 4 or 2 x 2 with --downsample 3 or 4). Each vector is replaced by its nearest
codebook entry e_k, k = argmin_j ||z_e - e_j||, and a decoder G maps the grid back to
x_hat. The argmin has no gradient, so the decoder's gradient is copied onto z_e
(straight-through: z_q = z_e + sg[e_k - z_e]). A PatchGAN discriminator D gives one
real/fake logit per 18 x 18 patch. The loss:

    L      = L_rec + L_VQ + w_d * lambda * L_GAN          (GAN term from step --disc-start)
    L_rec  = |x - x_hat|_1 + w_p * L_perc
    L_VQ   = ||sg[z_e] - z_q||^2 + beta * ||z_e - sg[z_q]||^2    (beta on the commitment)
    L_GAN  = -mean D(x_hat);   L_D = mean relu(1 - D(x)) + mean relu(1 + D(sg[x_hat]))
    lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped to [0, --max-lambda]

G_L is the decoder's last layer (Esser et al. 2021, eq. 7); w_d = --disc-weight. L_perc is
feature matching on D's hidden layers (mean |f(x) - f(x_hat)|), since LPIPS needs
pretrained weights. Codes unused for --dead-after steps restart on encoder outputs.

Stage two, the prior: a causal transformer reads the token grid in raster order, the
class label first: p(k_1..k_T | c) = prod_t p(k_t | c, k_<t), trained by next-token
cross-entropy; sampling draws k_t from softmax(logits / temperature) over the top-k.

Shape legend: B batch, C channels, H W height width, K codebook size, D code dim, T tokens, E width.

Papers: Esser, Rombach & Ommer (2021), "Taming Transformers for High-Resolution Image
Synthesis"; van den Oord et al. (2017); Isola et al. (2017), PatchGAN; Lim & Ye (2017).

Run:  python vqgan.py                                        (both stages)
      python vqgan.py --no-gan --out runs/vqgan_nogan         (the ablation)
      python vqgan.py --downsample 4 --out runs/vqgan_2x2     (where the GAN pays: 2 x 2 tokens)
      python vqgan.py --sample-only --ckpt runs/vqgan/model.pt --num-samples 500
Default run -> runs/vqgan/{recon.png, samples.png, samples.npy, model.pt, metrics.json}: about
13 min on a 2-core CPU, test PSNR 21.6 dB. The GAN buys a lower recon FD only at 2 x 2 (README).
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
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- stage one: the tokenizer

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
    straight-through gradient and the two VQ loss terms returned separately."""

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
        tokens = dist.argmin(1)                                         # (B*H*W,)
        e_k = e[tokens].view(B, H, W, D).permute(0, 3, 1, 2)            # (B, D, H, W)
        # codebook = ||sg[z_e] - e_k||^2 moves the codes; commit = ||z_e - sg[e_k]||^2
        # moves the encoder (beta multiplies it in vq_loss).
        codebook = (z_e.detach() - e_k).pow(2).mean()
        commit = (z_e - e_k.detach()).pow(2).mean()
        # Straight-through: forward value e_k, gradient d/dz_q copied onto z_e.
        z_q = z_e + (e_k - z_e).detach()
        if self.training:
            self.hits += torch.bincount(tokens, minlength=e.shape[0]).to(self.hits.dtype)
        return z_q, tokens.view(B, H, W), codebook, commit

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


def grid_sides(downsample):
    """Sides of the feature maps after each stride-2 step: 28 -> 14 -> 7 (-> 4 -> 2)."""
    sides = [28]
    for _ in range(downsample):
        sides.append((sides[-1] + 1) // 2)
    return sides


class VQGAN(nn.Module):
    """Encoder 28 -> 14 -> 7 (-> 4 -> 2), vector quantiser, decoder back to 28 x 28."""

    def __init__(self, K=256, D=32, width=32, downsample=2):
        super().__init__()
        c1, c2 = width, 2 * width
        sides = grid_sides(downsample)
        self.side = sides[-1]                                           # tokens per row
        enc = [nn.Conv2d(1, c1, 4, 2, 1), ResBlock(c1, c1),               # (B, c1, 14, 14)
               nn.Conv2d(c1, c2, 4, 2, 1), ResBlock(c2, c2), ResBlock(c2, c2)]  # (B, c2, 7, 7)
        for _ in sides[3:]:                                             # 7 -> 4 -> 2
            enc += [nn.Conv2d(c2, c2, 3, 2, 1), ResBlock(c2, c2)]
        self.encoder = nn.Sequential(*enc, nn.GroupNorm(8, c2), nn.SiLU(),
                                     nn.Conv2d(c2, D, 1))               # (B, D, side, side)
        self.quantizer = VectorQuantizer(K, D)
        dec = [nn.Conv2d(D, c2, 3, 1, 1), ResBlock(c2, c2), ResBlock(c2, c2)]
        for big, small in reversed(list(zip(sides[2:], sides[3:]))):   # 2 -> 4 -> 7
            # transposed conv, stride 2, padding 1: out = 2 (small - 1) - 2 + kernel = big
            dec += [nn.ConvTranspose2d(c2, c2, big - 2 * small + 4, 2, 1), ResBlock(c2, c2)]
        self.decoder = nn.Sequential(
            *dec, nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c2, c1, 3, 1, 1), ResBlock(c1, c1),                # (B, c1, 14, 14)
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, 1, 1))   # (B, 1, 28, 28)
        # Linear output (no tanh): L1's gradient is sign(x_hat - x), which a
        # saturating tanh would kill; images are clamped only when shown or scored.

    @property
    def last_layer(self):
        """G_L, the weight at which the adaptive GAN weight compares gradients."""
        return self.decoder[-1].weight

    def forward(self, x):
        z_e = self.encoder(x)                                           # (B, D, side, side)
        z_q, tokens, codebook, commit = self.quantizer(z_e)
        return self.decoder(z_q), z_e, tokens, codebook, commit

    def decode_tokens(self, tokens):
        """Token grids (B, side, side) -> x_hat (B, 1, 28, 28) in [-1, 1] (unclamped)."""
        return self.decoder(self.quantizer.codebook(tokens).permute(0, 3, 1, 2))


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


def generator_loss(model, disc, x, beta=0.25, perceptual_weight=1.0, use_gan=False,
                   disc_weight=0.2, max_lambda=1e4):
    """Every term of the tokenizer's loss, returned separately, and their total.

    Without use_gan the GAN term is not in the graph at all, so it adds exactly nothing."""
    x_hat, z_e, tokens, codebook, commit = model(x)
    terms = {"l1": (x_hat - x).abs().mean(), "codebook": codebook, "commit": commit}
    rec = terms["l1"]
    if perceptual_weight or use_gan:
        logits_fake, feats_fake = disc(x_hat)
    if perceptual_weight:
        with torch.no_grad():
            _, feats_real = disc(x)
        terms["perc"] = feature_matching(feats_real, feats_fake)
        rec = rec + perceptual_weight * terms["perc"]
    total = rec + vq_loss(codebook, commit, beta)
    if use_gan:
        terms["gan"] = hinge_g_loss(logits_fake)
        terms["lambda"] = adaptive_weight(rec, terms["gan"], model.last_layer, max_lambda)
        total = total + disc_weight * terms["lambda"] * terms["gan"]
    terms["total"] = total
    return terms, x_hat, z_e


def generator_step(model, disc, opt_g, x, **loss_kw):
    """One optimizer step of encoder, codebook and decoder; D's weights are frozen
    (requires_grad off), so the step cannot touch them."""
    disc.requires_grad_(False)
    terms, x_hat, z_e = generator_loss(model, disc, x, **loss_kw)
    opt_g.zero_grad(set_to_none=True)
    terms["total"].backward()
    opt_g.step()
    disc.requires_grad_(True)
    return terms, x_hat.detach(), z_e.detach()


def discriminator_step(disc, opt_d, x, x_hat):
    """One hinge step of D on real x and *detached* reconstructions."""
    logits_real, _ = disc(x)
    logits_fake, _ = disc(x_hat.detach())
    loss = hinge_d_loss(logits_real, logits_fake)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return loss.detach()


# ----------------------------------------------------------------------------- stage two: the token prior

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


# ----------------------------------------------------------------------------- the experiment

def mnist_tensors(data_dir, split):
    """Images as float (N, 1, 28, 28) in [-1, 1], and labels (N,)."""
    images, labels = load_mnist(data_dir, split)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(labels)


def to_unit(x):
    """[-1, 1] -> [0, 1], clamped: how images are shown and scored."""
    return ((x + 1) / 2).clamp(0, 1)


def build(cfg, device):
    """The tokenizer, its discriminator and the prior, from the flags or a checkpoint's config."""
    model = VQGAN(cfg["codebook_size"], cfg["code_dim"], cfg["width"], cfg["downsample"]).to(device)
    disc = PatchDiscriminator(cfg["width"]).to(device)
    prior = TokenPrior(cfg["codebook_size"], model.side ** 2, NUM_CLASSES, cfg["prior_width"],
                       cfg["prior_layers"], cfg["prior_heads"]).to(device)
    return model, disc, prior


def train_tokenizer(model, disc, x_train, args, device):
    """Alternate one generator step and one discriminator step; restart dead codes."""
    opt_g = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9))
    loss_kw = dict(beta=args.beta, disc_weight=args.disc_weight, max_lambda=args.max_lambda,
                   perceptual_weight=args.perceptual_weight if args.perceptual else 0.0)
    train_disc = loss_kw["perceptual_weight"] > 0 or args.gan
    progress, restarted = Progress(args.tok_steps, label="tokenizer"), 0
    model.train()
    disc.train()
    for step, idx in enumerate(batches(len(x_train), args.batch_size, args.tok_steps), 1):
        x = x_train[idx].to(device)
        use_gan = args.gan and step > args.disc_start
        terms, x_hat, z_e = generator_step(model, disc, opt_g, x, use_gan=use_gan, **loss_kw)
        if train_disc:
            terms["disc"] = discriminator_step(disc, opt_d, x, x_hat)
        if args.dead_after and step % args.dead_after == 0:
            restarted += model.quantizer.restart_dead_codes(z_e)
        log_step(progress, step, args.tok_steps, len(x), terms)
    print(f"tokenizer: {restarted} dead codes restarted in all", flush=True)
    return args.tok_steps


@torch.no_grad()
def encode_tokens(model, x, device, batch_size=1000):
    """Token grids (N, side, side) of a whole split."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size].to(device))[2].cpu()
                      for i in range(0, len(x), batch_size)])


def train_prior(prior, tokens, labels, args, device):
    """Next-token cross-entropy with AdamW, warm-up and cosine decay."""
    opt = torch.optim.AdamW(prior.parameters(), lr=args.prior_lr, weight_decay=0.01)
    total = args.prior_steps
    progress = Progress(total, label="prior")
    prior.train()
    for step, idx in enumerate(batches(len(tokens), args.prior_batch_size, total), 1):
        for group in opt.param_groups:
            group["lr"] = args.prior_lr * cosine_lr(step - 1, total, warmup=min(100, total // 10))
        loss = prior_nll(prior, tokens[idx].to(device), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log_step(progress, step, total, len(idx), {"nll_bits_per_token": loss.detach() / math.log(2)})
    return total


def train_run(args, x_train, y_train, device, out):
    """Both stages; model.pt holds every stage's weights. Returns model, prior, steps, seconds."""
    check_batch_sizes(args, len(x_train))
    model, disc, prior = build(vars(args), device)
    start = time.time()
    steps = {"tok": train_tokenizer(model, disc, x_train, args, device), "prior": 0}
    state = {"tokenizer": model.state_dict(), "disc": disc.state_dict()}
    if args.prior_steps:
        tokens = encode_tokens(model, x_train, device).flatten(1)       # (N, T)
        steps["prior"] = train_prior(prior, tokens, y_train, args, device)
        state["prior"] = prior.state_dict()
    else:
        prior = None
    seconds = time.time() - start
    save_checkpoint(out / "model.pt", state, vars(args))
    return model, prior, steps, seconds


@torch.no_grad()
def evaluate_tokenizer(model, x, device, batch_size=1000):
    """Reconstruction error in [0, 1] pixel units, PSNR, and how the codebook is used:
    usage = fraction of the K codes chosen at least once on these images,
    perplexity = exp(entropy of the code frequencies) (K if all equally used).
    Also returns the reconstructions (N, 1, 28, 28) in [0, 1]."""
    model.eval()
    K = model.quantizer.codebook.num_embeddings
    recons, counts = [], torch.zeros(K)
    for i in range(0, len(x), batch_size):
        x_hat, _, tokens, _, _ = model(x[i:i + batch_size].to(device))
        recons.append(to_unit(x_hat).cpu())
        counts += torch.bincount(tokens.flatten(), minlength=K).cpu().float()
    recons, target = torch.cat(recons), to_unit(x)
    mse = (recons - target).pow(2).mean().item()
    p = counts[counts > 0] / counts.sum()
    return {"test_recon_l1": (recons - target).abs().mean().item(), "test_mse": mse,
            "test_psnr_db": 10 * math.log10(1.0 / mse),
            "codebook_usage": (counts > 0).float().mean().item(),
            "codebook_perplexity": math.exp(-(p * p.log()).sum().item())}, recons


@torch.no_grad()
def evaluate_prior(prior, tokens, labels, device, batch_size=500):
    """-log2 p(tokens | class), summed over the T tokens, averaged over images."""
    prior.eval()
    nats = 0.0
    for i in range(0, len(tokens), batch_size):
        t, c = tokens[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        nats += prior_nll(prior, t, c).item() * t.numel()
    return {"test_prior_nll_bits": nats / len(tokens) / math.log(2)}


@torch.no_grad()
def sample_images(model, prior, n, temperature, top_k, seed, device):
    """n samples (n, 1, 28, 28) in [0, 1], classes 0..9 in equal shares, in order."""
    labels = (torch.arange(n) * NUM_CLASSES // n).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = sample_tokens(prior, labels, temperature=temperature, top_k=top_k, generator=gen)
    model.eval()
    x_hat = model.decode_tokens(tokens.view(n, model.side, model.side))
    return to_unit(x_hat).cpu(), labels.cpu()


# ----------------------------------------------------------------------------- main

def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    out = prepare_out_dir(args.out)
    x_train, y_train = mnist_tensors(args.data_dir, "train")
    x_test, y_test = mnist_tensors(args.data_dir, "test")
    x_test, y_test = x_test[:args.test_limit or None], y_test[:args.test_limit or None]
    if args.sample_only:
        model, prior, steps, seconds = load_run(args.ckpt, device)
    else:
        model, prior, steps, seconds = train_run(args, x_train, y_train, device, out)
    metrics, recons = evaluate_tokenizer(model, x_test, device)
    samples = labels = None
    if prior is not None:
        metrics.update(evaluate_prior(prior, encode_tokens(model, x_test, device).flatten(1),
                                      y_test, device))
        samples, labels = sample_images(model, prior, args.num_samples, args.temperature,
                                        args.top_k, args.seed, device)
    write_outputs(out, x_test, recons, samples)
    metrics.update(judge_report(out, device, to_unit(x_train), y_train, to_unit(x_test), y_test,
                                samples=samples, sample_labels=labels, recons=recons,
                                judge_steps=args.steps or None))
    metrics.update(train_seconds=round(seconds, 1), steps=steps["tok"] + steps["prior"],
                   tokenizer_steps=steps["tok"], prior_steps=steps["prior"], device=str(device),
                   test_images=len(x_test))
    write_metrics(out / ("eval_metrics.json" if args.sample_only else "metrics.json"), metrics)
    print(json.dumps(metrics))
    return metrics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    reject_renamed(p, argv, {"--K": "--codebook-size", "--restart-every": "--dead-after"})
    add = p.add_argument
    add("--data-dir", default=str(HERE / "data" / "mnist"),
        help="folder with the four MNIST idx .gz files (downloaded if missing)")
    add("--out", default=f"runs/{SCRIPT}", help="output folder")
    add("--steps", type=int, default=0, help="cap on the optimizer steps of each stage (0: no cap)")
    add("--tok-steps", type=int, default=2000, help="tokenizer (stage one) steps")
    add("--prior-steps", type=int, default=1500, help="prior (stage two) steps; 0: tokenizer only")
    add("--batch-size", type=int, default=64)
    add("--lr", type=float, default=5e-4, help="tokenizer learning rate")
    add("--disc-lr", type=float, default=5e-4, help="discriminator learning rate")
    add("--codebook-size", type=int, default=256, help="K, number of codes")
    add("--code-dim", type=int, default=32, help="D, size of a code vector")
    add("--downsample", type=int, default=2, choices=(2, 3, 4),
        help="stride-2 steps of the encoder: 2, 3, 4 give 7 x 7, 4 x 4, 2 x 2 tokens")
    add("--width", type=int, default=32, help="channels at 14 x 14 (twice that below)")
    add("--beta", type=float, default=0.25, help="weight of the commitment term")
    add("--dead-after", type=int, default=100,
        help="every N steps, restart the codes unused in those N steps (0: never)")
    add("--disc-start", type=int, default=800, help="step after which lambda * L_GAN joins the loss")
    add("--max-lambda", type=float, default=1e4, help="clamp of the adaptive weight lambda")
    add("--disc-weight", type=float, default=0.2, help="w_d, constant factor on lambda")
    add("--no-gan", dest="gan", action="store_false",
        help="drop lambda * L_GAN from the generator loss (the ablation)")
    add("--no-perceptual", dest="perceptual", action="store_false",
        help="drop the feature-matching perceptual term")
    add("--perceptual-weight", type=float, default=1.0, help="w_p")
    add("--prior-batch-size", type=int, default=128)
    add("--prior-lr", type=float, default=1e-3)
    add("--prior-width", type=int, default=128, help="E, transformer width")
    add("--prior-layers", type=int, default=4)
    add("--prior-heads", type=int, default=4)
    add("--temperature", type=float, default=1.0)
    add("--top-k", type=int, default=32, help="sample among the k likeliest codes (0: all)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--seed", type=int, default=0)
    add("--num-samples", type=int, default=100, help="spread evenly over the 10 classes")
    add("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all)")
    add("--sample-only", action="store_true", help="skip training: load --ckpt, evaluate, sample")
    add("--ckpt", help="checkpoint to load with --sample-only")
    args = p.parse_args(argv)
    check_flags(p, args, positive=("tok_steps", "batch_size", "lr", "disc_lr", "codebook_size",
                                   "code_dim", "width", "prior_batch_size", "prior_lr", "prior_width",
                                   "prior_layers", "prior_heads", "temperature", "num_samples"),
                nonnegative=("steps", "prior_steps", "disc_start", "test_limit", "dead_after", "beta",
                             "max_lambda", "disc_weight", "perceptual_weight", "top_k"))
    problem = config_problem(vars(args))
    if problem:
        p.error(problem)
    if args.sample_only and not args.ckpt:
        p.error("--sample-only needs --ckpt PATH")
    if args.steps:
        args.tok_steps = min(args.tok_steps, args.steps)
        args.prior_steps = min(args.prior_steps, args.steps)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except RunError as e:
        sys.exit(f"error: {e}")


# ============================================================================ appendix: plumbing every script repeats

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


# ============================================================================ checking flags and checkpoints

CONFIG = {"codebook_size": int, "code_dim": int, "width": int, "downsample": int,
          "prior_width": int, "prior_layers": int, "prior_heads": int}


def config_problem(cfg):
    """What is wrong with a model configuration (from the flags or a checkpoint), or None."""
    for key in CONFIG:
        if not 1 <= cfg[key] <= (65536 if key == "codebook_size" else 4096):
            return f"{key} = {cfg[key]} is out of range"
    if cfg["downsample"] not in (2, 3, 4):
        return "--downsample must be 2, 3 or 4 (7 x 7, 4 x 4 or 2 x 2 tokens)"
    if cfg["width"] % 8 or cfg["prior_width"] % cfg["prior_heads"]:
        return "--width must be a multiple of 8 and --prior-width of --prior-heads"
    return None


def check_batch_sizes(args, n_train):
    """A batch must fit in the training set (known only once the data is loaded)."""
    for flag, size in (("batch_size", args.batch_size), ("prior_batch_size", args.prior_batch_size)):
        if size > n_train:
            raise RunError(f"--{flag.replace('_', '-')} {size} is larger than the training set "
                           f"({n_train} images)")


def load_run(path, device):
    """The tokenizer (and prior, if trained) of a checkpoint, checked before use."""
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, CONFIG, path)
    problem = config_problem(cfg)
    if problem:
        raise RunError(f"{path}: broken config ({problem})")
    model, _, prior = build(cfg, device)
    weights = ckpt["model"]
    if "tokenizer" not in weights:
        raise RunError(f"{path}: no tokenizer weights")
    load_weights(model, weights["tokenizer"], path)
    if "prior" in weights:
        load_weights(prior, weights["prior"], path)
    else:
        prior = None
    return model, prior, {"tok": 0, "prior": 0}, 0.0


# ============================================================================ logging and writing outputs

def log_step(progress, step, total, batch, terms, every=25):
    """Read the losses (a host-device sync on a GPU) only every `every` steps and at
    the end; a non-finite loss stops the run there, before any checkpoint is written."""
    if step % every and step != total:
        return
    values = {k: v.item() for k, v in terms.items() if k != "total"}
    check_finite(step, **values)
    progress.update(step, batch * (step % every or every), **values)


def write_outputs(out, x_test, recons, samples):
    """recon.png: rows of 16 test digits, each row followed by its reconstruction;
    samples.png (one row per class) and samples.npy (N, 1, 28, 28) in [0, 1]."""
    cols = min(16, len(x_test))
    nrow = min(4, len(x_test) // cols)
    rows = torch.stack([to_unit(x_test[:nrow * cols]).view(nrow, cols, 1, 28, 28),
                        recons[:nrow * cols].view(nrow, cols, 1, 28, 28)], 1)
    write_png(out / "recon.png", image_grid(rows.reshape(-1, 1, 28, 28), ncol=cols))
    if samples is not None:
        atomic_write(out / "samples.npy", lambda f: np.save(f, samples.numpy()))
        write_png(out / "samples.png", image_grid(samples, ncol=-(-len(samples) // NUM_CLASSES)))


if __name__ == "__main__":
    main()
