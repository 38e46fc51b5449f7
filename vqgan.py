"""VQGAN: a vector-quantised tokenizer trained with a patch GAN, and a small causal
transformer that writes images with its tokens (MNIST, or your own images).

Stage one, the tokenizer. An encoder maps an image x to a grid of vectors z_e (h x w =
H/4 x W/4, halved again per --downsample step past 2: 28 -> 7, 4, 2). Each is replaced by
its nearest codebook entry e_k, k = argmin_j ||z_e - e_j||, and a decoder G maps the grid
back to x_hat. The argmin has no gradient, so the decoder's gradient is copied onto z_e
(straight-through: z_q = z_e + sg[e_k - z_e]). A PatchGAN D gives one real/fake logit per
18 x 18 patch. The loss:

    L      = L_rec + L_VQ + w_d * lambda * L_GAN          (GAN term from step --disc-start)
    L_rec  = |x - x_hat|_1 + w_p * L_perc
    L_VQ   = ||sg[z_e] - z_q||^2 + beta * ||z_e - sg[z_q]||^2    (beta on the commitment)
    L_GAN  = -mean D(x_hat);   L_D = mean relu(1 - D(x)) + mean relu(1 + D(sg[x_hat]))
    lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped to [0, 1e4]

G_L is the decoder's last layer (Esser et al. 2021, eq. 7); w_d = --disc-weight. L_perc is
feature matching on D's hidden layers (mean |f(x) - f(x_hat)|), since LPIPS needs
pretrained weights. Codes unused for --dead-after steps restart on encoder outputs.

Stage two, the prior: a causal transformer reads the token grid in raster order, the class
label first (one "no label" class on unlabelled data): p(k_1..k_T | c) = prod_t p(k_t | c,
k_<t), by next-token cross-entropy; samples draw k_t from softmax(logits / temperature), top k.

Esser, Rombach & Ommer (2021), "Taming Transformers for High-Resolution Image Synthesis";
van den Oord et al. (2017), VQ-VAE; Isola et al. (2017), PatchGAN; Lim & Ye (2017), hinge.

Run:  python vqgan.py                  (MNIST; --no-gan: the ablation; --downsample 4: 2 x 2 tokens)
      python vqgan.py --data imgs.npy  (your images, (N, H, W) or (N, C, H, W), H and W multiples of 4)
      python vqgan.py --sample-only --ckpt runs/vqgan/model.pt --num-samples 500
Default run, about 7 min on a 2-core CPU, test PSNR 23.9 dB -> runs/vqgan/: model.pt, metrics.json,
recon.png, recon.npy, samples.png, samples.npy, sample_labels.npy. Shapes: B batch, C channels,
H W height width, K codebook size, D code dim, h w token grid, T = h * w tokens, E width.
"""

import argparse, gzip, json, math, os, random, struct, sys, time, zlib  # the appendix needs most
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SCRIPT = "vqgan"


# ----------------------------------------------------------------------------- stage one: the tokenizer

class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))): the residual block of VQGAN's encoder/decoder."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1),
                                  nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, x):
        return x + self.body(x)


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
        # moves the encoder (beta multiplies it in the loss).
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


class VQGAN(nn.Module):
    """Encoder H -> H/2 -> H/4 (-> /8 -> /16, rounded up), vector quantiser, decoder back."""

    def __init__(self, K=256, D=32, width=32, downsample=2, channels=1, size=(28, 28)):
        super().__init__()
        c1, c2 = width, 2 * width
        # Sides after each stride-2 step, 28 -> 14 -> 7 (-> 4 -> 2): the first two halve
        # exactly (the decoder undoes them by 2x upsampling), later ones round up.
        hs, ws = ([-(-side // 2 ** k) for k in range(downsample + 1)] for side in size)
        self.grid = (hs[-1], ws[-1])                                    # h, w: the token grid
        enc = [nn.Conv2d(channels, c1, 4, 2, 1), ResBlock(c1),       # (B, c1, H/2, W/2)
               nn.Conv2d(c1, c2, 4, 2, 1), ResBlock(c2), ResBlock(c2)]  # (B, c2, H/4, W/4)
        for _ in range(downsample - 2):                                 # 7 -> 4 -> 2
            enc += [nn.Conv2d(c2, c2, 3, 2, 1), ResBlock(c2)]
        self.encoder = nn.Sequential(*enc, nn.GroupNorm(8, c2), nn.SiLU(), nn.Conv2d(c2, D, 1))  # (B, D, h, w)
        self.quantizer = VectorQuantizer(K, D)
        dec = [nn.Conv2d(D, c2, 3, 1, 1), ResBlock(c2), ResBlock(c2)]
        for i in range(downsample, 2, -1):                              # 2 -> 4 -> 7
            # transposed conv, stride 2, padding 1: out = 2 (small - 1) - 2 + kernel = big
            kernel = (hs[i - 1] - 2 * hs[i] + 4, ws[i - 1] - 2 * ws[i] + 4)
            dec += [nn.ConvTranspose2d(c2, c2, kernel, 2, 1), ResBlock(c2)]
        self.decoder = nn.Sequential(*dec, nn.Upsample(scale_factor=2, mode="nearest"),
                                     nn.Conv2d(c2, c1, 3, 1, 1), ResBlock(c1),   # (B, c1, H/2, W/2)
                                     nn.Upsample(scale_factor=2, mode="nearest"), nn.GroupNorm(8, c1),
                                     nn.SiLU(), nn.Conv2d(c1, channels, 3, 1, 1))  # (B, C, H, W)
        # Linear output (no tanh): L1's gradient is sign(x_hat - x), which a
        # saturating tanh would kill; images are clamped only when shown or scored.

    def forward(self, x):
        """x (B, C, H, W) in [-1, 1] -> x_hat (B, C, H, W) and the loss terms that need no
        discriminator: l1 = mean |x - x_hat|, codebook, commit (see generator_loss)."""
        z_q, tokens, codebook, commit = self.quantizer(self.encoder(x))   # tokens (B, h, w)
        x_hat = self.decoder(z_q)
        return x_hat, {"l1": (x_hat - x).abs().mean(), "codebook": codebook, "commit": commit}

    def decode_tokens(self, tokens):
        """Token grids (B, h, w) -> x_hat (B, C, H, W) in [-1, 1] (unclamped)."""
        return self.decoder(self.quantizer.codebook(tokens).permute(0, 3, 1, 2))


class PatchDiscriminator(nn.Module):
    """PatchGAN: logits (B, 1, H/4, W/4), each with an 18 x 18 receptive field, and the hidden
    features that feed the feature-matching perceptual term."""

    def __init__(self, width=32, channels=1):
        super().__init__()
        # No normalisation layer: GroupNorm (or BatchNorm) pools statistics over
        # the whole image, and every logit would then depend on every pixel.
        self.block1 = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2))  # rf 4
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2))  # rf 10
        self.head = nn.Conv2d(2 * width, 1, 3, 1, 1)                      # rf 18, (B, 1, H/4, W/4)

    def forward(self, x):
        f1 = self.block1(x)
        f2 = self.block2(f1)
        return self.head(f2), [f1, f2]


def hinge_d_loss(logits_real, logits_fake):
    """L_D = mean relu(1 - D(x)) + mean relu(1 + D(x_hat))."""
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()


def adaptive_weight(rec_loss, gan_loss, last_layer, max_weight=1e4):
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped, no gradient."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    lam = g_rec.norm() / (g_gan.norm() + 1e-4)
    return lam.clamp(0.0, max_weight).detach()


def generator_loss(model, disc, x, beta=0.25, perceptual_weight=1.0, use_gan=False, disc_weight=0.2):
    """Every term of the tokenizer's loss on x (B, C, H, W), returned separately, and their
    total; also x_hat and z_e. Without use_gan the GAN term is not in the graph at all."""
    z_e = model.encoder(x)                                              # (B, D, h, w)
    z_q, _, codebook, commit = model.quantizer(z_e)
    x_hat = model.decoder(z_q)
    terms = {"l1": (x_hat - x).abs().mean(), "codebook": codebook, "commit": commit}
    rec = terms["l1"]
    if perceptual_weight or use_gan:
        logits_fake, feats_fake = disc(x_hat)
    if perceptual_weight:  # L_perc = mean over D's hidden layers of mean |f(x) - f(x_hat)|
        with torch.no_grad():
            _, feats_real = disc(x)
        terms["perc"] = sum((r - f).abs().mean() for r, f in zip(feats_real, feats_fake)) / len(feats_real)
        rec = rec + perceptual_weight * terms["perc"]
    total = rec + codebook + beta * commit                              # + L_VQ, beta on the commitment
    if use_gan:
        terms["gan"] = -logits_fake.mean()                              # L_GAN = -mean D(x_hat)
        terms["lambda"] = adaptive_weight(rec, terms["gan"], model.decoder[-1].weight)  # at G_L
        total = total + disc_weight * terms["lambda"] * terms["gan"]
    terms["total"] = total
    return terms, x_hat, z_e


def generator_step(model, disc, opt_g, x, **loss_kw):
    """One optimizer step of encoder, codebook and decoder; D is frozen, so it cannot move."""
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

MODEL_FLAGS = ("codebook_size", "code_dim", "width", "downsample", "prior_width", "prior_layers", "prior_heads")


def build(cfg):
    """Tokenizer, discriminator and prior from a config: the MODEL_FLAGS, image_shape, num_classes."""
    C, H, W = cfg["image_shape"]
    tokenizer = VQGAN(cfg["codebook_size"], cfg["code_dim"], cfg["width"], cfg["downsample"], C, (H, W))
    prior = TokenPrior(cfg["codebook_size"], math.prod(tokenizer.grid), cfg["num_classes"],
                       cfg["prior_width"], cfg["prior_layers"], cfg["prior_heads"])
    return nn.ModuleDict({"tokenizer": tokenizer, "disc": PatchDiscriminator(cfg["width"], C), "prior": prior})


def to_unit(x):  # [-1, 1] -> [0, 1], clamped: how images are shown and scored
    return ((x + 1) / 2).clamp(0, 1)


def train_tokenizer(model, disc, x_train, args, device):
    """Alternate one generator step and one discriminator step; restart dead codes. Both stages train
    under bf16 autocast unless --no-bf16 (weights, optimiser, losses fp32): 1.8x faster with AMX."""
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.5, 0.9)) for m in (model, disc))
    loss_kw = dict(beta=args.beta, perceptual_weight=args.perceptual_weight, disc_weight=args.disc_weight)
    progress, restarts = Progress(args.tok_steps, "tokenizer"), 0
    model.train()                                       # the quantiser counts code hits in training
    for step, idx in enumerate(batches(len(x_train), args.batch_size, args.tok_steps), 1):
        x, use_gan = x_train[idx].to(device), args.gan and step > args.disc_start
        for opt in (opt_g, opt_d):  # cosine decay to 0: at a constant lr the GAN's last step is noisy
            opt.param_groups[0]["lr"] = args.lr * cosine_lr(step - 1, args.tok_steps)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            terms, x_hat, z_e = generator_step(model, disc, opt_g, x, use_gan=use_gan, **loss_kw)
            if args.perceptual_weight or args.gan:  # D serves the perceptual term too
                terms["disc"] = discriminator_step(disc, opt_d, x, x_hat)
        if args.dead_after and step % args.dead_after == 0:
            restarts += model.quantizer.restart_dead_codes(z_e.float())   # bf16 -> the fp32 codebook
        progress(step, len(x), **{k: v.detach() for k, v in terms.items() if k != "total"}, restarts=restarts)


@torch.no_grad()
def encode(model, x, device, decode=False, batch_size=1000):
    """Token grids (N, h, w) of images (N, C, H, W); with decode=True, reconstructions in [0, 1]."""
    model.eval()
    tokens, recons, progress = [], [], Progress(len(x), "decode" if decode else "tokenise")
    for i in range(0, len(x), batch_size):
        z_q, t, _, _ = model.quantizer(model.encoder(x[i:i + batch_size].to(device)))
        tokens.append(t.cpu())
        if decode:
            recons.append(to_unit(model.decoder(z_q)).cpu())
        progress(i + len(t), len(t))
    return torch.cat(tokens), torch.cat(recons) if decode else None


def train_prior(prior, tokenizer, x_train, labels, args, device):
    """Next-token cross-entropy with AdamW, warm-up and cosine decay, on the training images'
    tokens, computed once and only for as many images as the steps read (short runs: few)."""
    n = min(len(x_train), args.prior_steps * args.prior_batch_size)
    tokens, labels = encode(tokenizer, x_train[:n], device)[0].flatten(1), labels[:n]   # (n, T), (n,)
    opt = torch.optim.AdamW(prior.parameters(), lr=args.prior_lr, weight_decay=0.01)
    total, progress = args.prior_steps, Progress(args.prior_steps, "prior")
    prior.train()
    for step, idx in enumerate(batches(len(tokens), args.prior_batch_size, total), 1):
        opt.param_groups[0]["lr"] = args.prior_lr * cosine_lr(step - 1, total, warmup=min(100, total // 10))
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):  # as in train_tokenizer
            loss = prior_nll(prior, tokens[idx].to(device), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(step, len(idx), nll_bits_per_token=loss.detach() / math.log(2))


@torch.no_grad()
def evaluate_and_sample(args, tokenizer, prior, num_classes, x_test, y_test, out, device):
    """Test metrics (error in [0, 1] pixel units; codebook usage, the share of the K codes chosen, and
    perplexity, exp of their entropy; the prior's -sum_t log2 p(z_t | z_<t, y)); recon.png/.npy; samples.png/.npy
    (a row per class), sample_labels.npy. Sampling runs at one CPU thread (faster on 2 busy cores, measured)."""
    tokens, recons = encode(tokenizer, x_test, device, decode=True)
    counts = torch.bincount(tokens.flatten(), minlength=tokenizer.quantizer.codebook.num_embeddings).float()
    p, mse = counts[counts > 0] / counts.sum(), (recons - to_unit(x_test)).pow(2).mean().item()
    nats = sum(prior_nll(prior.eval(), t.to(device), c.to(device)).item() * t.numel()
               for t, c in zip(tokens.flatten(1).split(500), y_test.split(500)))
    metrics = {"test_recon_l1": (recons - to_unit(x_test)).abs().mean().item(), "test_mse": mse,
               "test_psnr_db": 10 * math.log10(1.0 / mse), "codebook_usage": (counts > 0).float().mean().item(),
               "codebook_perplexity": math.exp(-(p * p.log()).sum().item()),
               "test_prior_nll_bits": nats / len(x_test) / math.log(2)}
    x, x_hat, cols, n = to_unit(x_test[:64]), recons[:64], min(16, len(x_test)), args.num_samples
    rows = [r for i in range(0, len(x), cols) for r in (x[i:i + cols], x_hat[i:i + cols])]
    write_png(out / "recon.png", image_grid(torch.cat(rows), cols))
    np.save(out / "recon.npy", recons[:500].numpy())
    labels, tokens, threads = (torch.arange(n) * num_classes // n).to(device), [], torch.get_num_threads()
    gen, progress = torch.Generator(device=device).manual_seed(args.seed), Progress(n, "sample")
    torch.set_num_threads(1)
    try:
        for c in labels.split(100):
            tokens.append(sample_tokens(prior, c, args.temperature, args.top_k, generator=gen))  # (B, T)
            progress(sum(map(len, tokens)), len(c))
    finally:
        torch.set_num_threads(threads)
    samples = to_unit(tokenizer.decode_tokens(torch.cat(tokens).view(n, *tokenizer.grid))).cpu()
    np.save(out / "samples.npy", samples.numpy())
    write_png(out / "samples.png", image_grid(samples, -(-n // num_classes) if num_classes else 10))
    if num_classes:
        np.save(out / "sample_labels.npy", labels.cpu().numpy())
    return metrics


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, nonnegative_float = p.add_argument, checked(float, lambda v: 0 <= v < math.inf, ">= 0")
    add("--data", default="mnist", help="mnist, or a .npy of images (N, H, W) or (N, C, H, W)")
    add("--data-dir", default=str(Path(__file__).parent / "data" / "mnist"), help="MNIST's folder")
    add("--out", help="output folder (None: runs/vqgan, or with --sample-only sample_only/ beside --ckpt)")
    add("--steps", type=nonnegative_int, default=0, help="cap on each stage's steps, --disc-start scaled alike (0: none)")
    add("--tok-steps", type=positive_int, default=2000, help="tokenizer (stage one) steps")
    add("--prior-steps", type=positive_int, default=1500, help="prior (stage two) steps")
    add("--batch-size", type=positive_int, default=64, help="tokenizer batch size")
    add("--lr", type=positive_float, default=5e-4, help="tokenizer and discriminator learning rate (cosine decay)")
    add("--codebook-size", type=positive_int, default=256, help="K, number of codes")
    add("--code-dim", type=positive_int, default=32, help="D, size of a code vector")
    add("--downsample", type=int, default=2, choices=(2, 3, 4), help="stride-2 steps: 7, 4, 2 tokens a side on MNIST")
    add("--width", type=checked(int, lambda v: v > 0 and v % 8 == 0, "a multiple of 8"), default=32, help="channels at H/2")
    add("--beta", type=nonnegative_float, default=0.25, help="weight of the commitment term")
    add("--dead-after", type=nonnegative_int, default=100, help="restart codes unused for N steps (0: never)")
    add("--disc-start", type=nonnegative_int, default=800, help="step after which lambda * L_GAN joins")
    add("--disc-weight", type=nonnegative_float, default=0.2, help="w_d, constant factor on lambda")
    add("--gan", action=argparse.BooleanOptionalAction, default=True, help="the adversarial term (--no-gan: the ablation)")
    add("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast in training")
    add("--perceptual-weight", type=nonnegative_float, default=1.0, help="w_p (0: no perceptual term)")
    add("--prior-batch-size", type=positive_int, default=128, help="prior batch size")
    add("--prior-lr", type=positive_float, default=1e-3, help="prior learning rate")
    add("--prior-width", type=positive_int, default=128, help="E, transformer width")
    add("--prior-layers", type=positive_int, default=4, help="transformer blocks")
    add("--prior-heads", type=positive_int, default=4, help="attention heads (dividing E)")
    add("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    add("--top-k", type=nonnegative_int, default=32, help="sample among the k likeliest codes (0: all)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    add("--seed", type=nonnegative_int, default=0, help="seeds random, numpy and torch")
    add("--num-samples", type=positive_int, default=100, help="samples, spread evenly over the classes")
    add("--test-limit", type=nonnegative_int, default=0, help="evaluate on the first N test images (0: all)")
    add("--sample-only", action="store_true", help="load --ckpt, then only evaluate and sample")
    add("--ckpt", help="the model.pt that --sample-only loads")
    args = p.parse_args(argv)
    changed = [f"--{f.replace('_', '-')}" for f in MODEL_FLAGS if getattr(args, f) != p.get_default(f)]
    if args.prior_width % args.prior_heads:
        p.error(f"--prior-width {args.prior_width} is not a multiple of --prior-heads {args.prior_heads}")
    if args.sample_only and (not args.ckpt or changed):
        p.error(f"{changed[0]} shapes the model; --sample-only loads --ckpt's" if changed else "--sample-only needs --ckpt")
    if args.steps:  # a short run keeps the schedule's shape: the GAN joins at the same fraction
        args.disc_start = args.disc_start * min(args.steps, args.tok_steps) // args.tok_steps
        args.tok_steps, args.prior_steps = min(args.tok_steps, args.steps), min(args.prior_steps, args.steps)
    return args


def run(args):
    device = pick_device(args.device)
    seed_everything(args.seed)
    x_test, y_test = load_images(args.data, args.data_dir, "test")
    x_test = x_test[:args.test_limit or None] * 2 - 1                                # in [-1, 1]
    (C, H, W), num_classes = x_test.shape[1:], 0 if y_test is None else 10
    y_test = torch.zeros(len(x_test), dtype=torch.long) if y_test is None else y_test[:len(x_test)]  # 0: "no label"
    if H % 4 or W % 4:
        raise RunError(f"--data {args.data}: {H} x {W} images; the encoder needs H and W divisible by 4")
    data, log = {"image_shape": [C, H, W], "num_classes": num_classes}, {"steps": 0, "train_seconds": 0.0}
    if args.sample_only:  # the models of --ckpt, into a folder that holds no training run
        nets, cfg = load_checkpoint(args.ckpt, build)
        if {k: cfg[k] for k in data} != data:
            raise RunError(f"{args.ckpt} was trained on other images than --data {args.data} ({data})")
    else:
        x_train, y_train = load_images(args.data, args.data_dir, "train")
        y_train = torch.zeros(len(x_train), dtype=torch.long) if y_train is None else y_train
        if max(args.batch_size, args.prior_batch_size) > len(x_train):
            raise RunError(f"a batch size is larger than the training set ({len(x_train)} images)")
        nets = build(cfg := {**data, **{k: getattr(args, k) for k in MODEL_FLAGS}})
    out = Path(args.out or (Path(args.ckpt).parent / "sample_only" if args.sample_only else f"runs/{SCRIPT}"))
    if args.sample_only and (out / "model.pt").exists():
        raise RunError(f"--out {out} holds a training run's model.pt; give --sample-only another folder")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, disc, prior = nets.to(device).values()
    if not args.sample_only:
        start, x_train = time.time(), x_train * 2 - 1
        train_tokenizer(tokenizer, disc, x_train, args, device)
        train_prior(prior, tokenizer, x_train, y_train, args, device)
        log = {"steps": args.tok_steps + args.prior_steps, "tokenizer_steps": args.tok_steps,
               "prior_steps": args.prior_steps, "train_seconds": round(time.time() - start, 1)}
        save_checkpoint(out / "model.pt", cfg, nets.state_dict())
    metrics = evaluate_and_sample(args, tokenizer, prior, cfg["num_classes"], x_test, y_test, out, device)
    metrics.update(**log, device=str(device), test_images=len(x_test))
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics))
    return metrics


def main(argv=None):
    try:
        return run(parse_args(argv))   # argparse's own errors exit inside parse_args
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
