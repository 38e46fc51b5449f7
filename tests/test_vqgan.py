"""Properties of vqgan.py: the adaptive GAN weight, the hinge losses and the separation of
the two players, the patch discriminator, the GAN schedule, the VQ gradients, the token
grids, the prior's causality and its sampler against the prior's own probabilities; your
own images, forward() from Python, the capped smoke run, and the CLI with its errors."""

import json
import math

import numpy as np
import pytest
import torch

import vqgan

TINY = ["--codebook-size", "16", "--code-dim", "8", "--width", "8", "--prior-width", "32", "--prior-layers", "2"]
CPU = torch.device("cpu")


def tiny_args(*extra):
    return vqgan.parse_args(TINY + list(extra))


def tiny_nets(args, image_shape=(1, 28, 28), num_classes=10):
    cfg = {"image_shape": list(image_shape), "num_classes": num_classes,
           **{k: getattr(args, k) for k in vqgan.MODEL_FLAGS}}
    return vqgan.build(cfg)


def tiny_models(args):
    nets = tiny_nets(args)
    return nets["tokenizer"], nets["disc"]


def loss_kw(args, use_gan=True):
    return dict(beta=args.beta, perceptual_weight=args.perceptual_weight, use_gan=use_gan,
                disc_weight=args.disc_weight)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def tiny_prior(K=4, T=4, width=16, layers=1):
    torch.manual_seed(0)
    return vqgan.TokenPrior(K, T, 10, width, layers, 2).eval()


def mnist(path, split):
    x, y = vqgan.load_images("mnist", path, split)
    return x * 2 - 1, y


# ----------------------------------------------------------------------------- the GAN

def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    # Tiny "decoder" whose last layer is y = h W^T; its gradients have a closed form:
    #   L_rec = mean |y - t|  ->  dL_rec/dW = mean_i sign(y_i - t_i) h_i
    #   L_GAN = -mean a * y   ->  dL_GAN/dW = -a mean_i h_i
    h, t, a = torch.randn(20, 5), torch.randn(20, 1), 0.3
    W = torch.randn(1, 5, requires_grad=True)
    y = h @ W.t()
    rec, gan = (y - t).abs().mean(), -(a * y).mean()
    g_rec = ((y - t).sign() * h).mean(0)
    g_gan = -a * h.mean(0)
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    lam = vqgan.adaptive_weight(rec, gan, W)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not lam.requires_grad
    assert vqgan.adaptive_weight(rec, gan, W, max_weight=1e-3).item() == pytest.approx(1e-3)


def test_total_loss_is_the_sum_of_its_terms_with_lambda_from_the_last_layer():
    """Catches lambda measured at another layer, w_d on the wrong term, a total that drops
    a term, L_GAN with the wrong sign, and L_perc that is not |f(x) - f(x_hat)| on D's layers."""
    args = tiny_args("--beta", "0.3", "--disc-weight", "0.7", "--perceptual-weight", "0.5")
    model, disc = tiny_models(args)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    terms, x_hat, _ = vqgan.generator_loss(model, disc, x, **loss_kw(args))
    logits_fake, feats_fake = disc(x_hat)
    _, feats_real = disc(x)
    assert terms["gan"].item() == pytest.approx(-logits_fake.mean().item(), rel=1e-6)
    perc = sum((r - f).abs().mean() for r, f in zip(feats_real, feats_fake)) / 2
    assert terms["perc"].item() == pytest.approx(perc.item(), rel=1e-6)
    rec = terms["l1"] + 0.5 * terms["perc"]
    last = model.decoder[-1].weight
    assert last.shape[0] == 1 and last.dim() == 4    # the conv that writes the image
    g_rec, = torch.autograd.grad(rec, last, retain_graph=True)
    g_gan, = torch.autograd.grad(terms["gan"], last, retain_graph=True)
    lam = (g_rec.norm() / (g_gan.norm() + 1e-4)).item()
    assert terms["lambda"].item() == pytest.approx(lam, rel=1e-5)
    expected = rec + terms["codebook"] + 0.3 * terms["commit"] + 0.7 * lam * terms["gan"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_beta_weighs_the_commitment_and_the_codes_get_the_full_codebook_term():
    """Catches beta on the codebook term instead of the commitment (the two are equal in
    value, so only gradients tell them apart) and a codebook term left out of the total."""
    torch.manual_seed(0)
    args = tiny_args("--beta", "0.3")
    model, disc = tiny_models(args)
    terms, _, _ = vqgan.generator_loss(model, disc, torch.rand(4, 1, 28, 28) * 2 - 1, beta=0.3,
                                       perceptual_weight=0.0, use_gan=False)
    e, first = model.quantizer.codebook.weight, model.encoder[0].weight
    grad = {k: torch.autograd.grad(terms[k], [e, first], retain_graph=True, allow_unused=True)
            for k in ("total", "l1", "codebook", "commit")}
    assert torch.allclose(grad["total"][0], grad["codebook"][0])    # L1, commit: no pull on codes
    want = grad["l1"][1] + 0.3 * grad["commit"][1]    # two backward passes: float noise ~1e-6
    assert torch.allclose(grad["total"][1], want, atol=1e-5 * want.abs().max().item())


def test_hinge_losses_on_hand_picked_logits():
    real = torch.tensor([2.0, 0.5, -1.0])   # relu(1 - real) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])   # relu(1 + fake) = 0, 1, 2     -> mean 1
    assert vqgan.hinge_d_loss(real, fake).item() == pytest.approx(5 / 6 + 1)
    # Beyond the margins the discriminator has nothing left to learn.
    assert vqgan.hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0


def test_each_player_step_leaves_the_other_players_weights_alone():
    """Catches fakes not detached in the discriminator step, and a generator step
    that moves D."""
    args = tiny_args()
    model, disc = tiny_models(args)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-2, betas=(0.5, 0.9))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    g0, d0 = params(model), params(disc)
    x_hat, _ = model(x)                      # still attached to the generator's graph
    vqgan.discriminator_step(disc, opt_d, x, x_hat)
    assert same(params(model), g0)
    assert all(p.grad is None for p in model.parameters())  # x_hat was detached
    assert not same(params(disc), d0)
    d1 = params(disc)
    terms, _, _ = vqgan.generator_step(model, disc, opt_g, x, **loss_kw(args))
    assert "gan" in terms
    assert same(params(disc), d1)
    assert not same(params(model), g0)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_discriminator_returns_a_patch_grid_with_a_small_receptive_field(channels, size):
    """Catches a normalisation layer (or a global pool) that lets every logit see
    the whole image."""
    disc = vqgan.PatchDiscriminator(8, channels)
    x = torch.randn(1, channels, size, size, requires_grad=True)
    logits, _ = disc(x)
    assert logits.shape == (1, 1, size // 4, size // 4)
    logits[0, 0, 3, 3].backward()
    rows, cols = (x.grad[0].abs().sum(0) != 0).nonzero().unbind(1)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert 4 < height <= 18 and 4 < width <= 18   # 18 x 18 patch, well inside the image


def test_gan_term_joins_only_after_disc_start_and_never_with_no_gan(monkeypatch, tiny_mnist_dir):
    """Catches the GAN term switched on one step early (>= instead of >) or ignoring --no-gan."""
    x, _ = mnist(tiny_mnist_dir, "train")
    seen = []

    def spy(model, disc, opt_g, x, use_gan, **kw):
        seen.append(use_gan)
        return real_step(model, disc, opt_g, x, use_gan=use_gan, **kw)

    real_step = vqgan.generator_step
    monkeypatch.setattr(vqgan, "generator_step", spy)
    for extra, expected in ((), [False] * 3 + [True] * 2), (("--no-gan",), [False] * 5):
        seen.clear()
        args = tiny_args("--tok-steps", "5", "--disc-start", "3", "--batch-size", "8", *extra)
        vqgan.train_tokenizer(*tiny_models(args), x, args, CPU)
        assert seen == expected
    assert tiny_args("--steps", "2").disc_start == 0      # a smoke run reaches the GAN too
    assert tiny_args("--steps", "50").disc_start == 20    # 800 of 2,000 -> 20 of 50


def test_both_players_learning_rates_decay_on_the_cosine_to_zero(monkeypatch, tiny_mnist_dir):
    """Catches a constant learning rate (the GAN's last step is then a noisy draw), the decay off
    by one step, or only one of the two players decayed."""
    x, _ = mnist(tiny_mnist_dir, "train")
    seen, real_step = [], vqgan.generator_step

    def spy(model, disc, opt_g, x, **kw):
        seen.append(opt_g.param_groups[0]["lr"])
        return real_step(model, disc, opt_g, x, **kw)

    monkeypatch.setattr(vqgan, "generator_step", spy)
    d_lrs, real_adam = [], torch.optim.Adam
    monkeypatch.setattr(vqgan.torch.optim, "Adam", lambda *a, **k: d_lrs.append(real_adam(*a, **k)) or d_lrs[-1])
    args = tiny_args("--tok-steps", "5", "--batch-size", "8", "--lr", "1e-3")
    vqgan.train_tokenizer(*tiny_models(args), x, args, CPU)
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 5)) for s in range(5)]   # 1e-3 at step 1, then down
    assert seen == pytest.approx(expected) and d_lrs[1].param_groups[0]["lr"] == pytest.approx(expected[-1])


# ----------------------------------------------------------------------------- the quantiser

def test_straight_through_and_the_two_vq_gradients():
    """Catches a missing sg[] on either term and the straight-through removed."""
    vq = vqgan.VectorQuantizer(K=8, D=4)
    vq.codebook.weight.data.normal_()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, tokens, codebook, commit = vq(z_e)
    e = vq.codebook.weight
    assert torch.allclose(z_q.detach(), e[tokens].permute(0, 3, 1, 2).detach(), atol=1e-6)
    # Straight-through: d(sum g * z_q)/dz_e = g exactly.
    g = torch.randn_like(z_q)
    grad_ze, = torch.autograd.grad((g * z_q).sum(), z_e, retain_graph=True)
    assert torch.equal(grad_ze, g)
    # The codebook term moves only the codes, the commitment term only the encoder.
    assert torch.autograd.grad(codebook, z_e, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(commit, e, retain_graph=True, allow_unused=True)[0] is None
    grad_ze, = torch.autograd.grad(commit, z_e, retain_graph=True)
    assert torch.allclose(grad_ze, 2 * (z_e - z_q).detach() / z_e.numel())
    # ... and the codes get the pull towards the encoder outputs that chose them.
    zq_flat = z_q.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    ze_flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.zeros_like(e).index_add_(0, tokens.flatten(), 2 * (zq_flat - ze_flat) / z_e.numel())
    assert torch.allclose(torch.autograd.grad(codebook, e)[0], expected)


def test_reconstruction_term_alone_reaches_the_encoder_through_straight_through():
    """Catches the straight-through estimator removed (z_q = e_k): the encoder then
    gets gradient only from the commitment term, and none from L1."""
    model, _ = tiny_models(tiny_args())
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    z_e = model.encoder(x)
    z_q, _, _, _ = model.quantizer(z_e)
    l1 = (model.decoder(z_q) - x).abs().mean()
    g_zq, g_ze = torch.autograd.grad(l1, [z_q, z_e], retain_graph=True)
    assert g_ze.abs().sum() > 0 and torch.equal(g_ze, g_zq)   # copied onto z_e unchanged
    g_enc, = torch.autograd.grad(l1, model.encoder[0].weight, allow_unused=True)
    assert g_enc is not None and g_enc.abs().sum() > 0


def test_dead_codes_restart_onto_encoder_outputs():
    vq = vqgan.VectorQuantizer(K=8, D=4)
    vq.hits.copy_(torch.tensor([3.0, 0, 1, 0, 0, 2, 0, 5]))
    live_before = vq.codebook.weight.detach()[[0, 2, 5, 7]].clone()
    z_e = torch.randn(2, 4, 3, 3) * 5
    assert vq.restart_dead_codes(z_e) == 4
    w = vq.codebook.weight.detach()
    assert torch.equal(w[[0, 2, 5, 7]], live_before)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(w[[1, 3, 4, 6]], flat).min(1).values
    assert torch.all(nearest < 0.2)             # on a batch vector, up to the 0.01 noise
    assert torch.all(vq.hits == 0)


@pytest.mark.parametrize("downsample,shape,grid", [(2, (1, 28, 28), (7, 7)), (3, (1, 28, 28), (4, 4)),
                                                   (4, (1, 28, 28), (2, 2)), (3, (3, 20, 12), (3, 2))])
def test_forward_token_grids_and_decode_tokens(downsample, shape, grid):
    """Catches a grid of the wrong size for --downsample or the image size, an output of
    another size than the input, and decode_tokens taking another path than forward (for
    example without the codebook lookup). forward(x) on (B, C, H, W) gives x_hat and terms."""
    args = tiny_args("--downsample", str(downsample))
    model = tiny_nets(args, shape)["tokenizer"].eval()
    x = torch.rand(2, *shape) * 2 - 1
    x_hat, terms = model(x)
    assert x_hat.shape == x.shape and model.grid == grid
    assert set(terms) == {"l1", "codebook", "commit"}
    assert terms["l1"].item() == pytest.approx((x_hat - x).abs().mean().item())
    tokens, recons = vqgan.encode(model, x, CPU, decode=True, batch_size=1)
    assert tokens.shape == (2, *grid) and torch.allclose(recons, vqgan.to_unit(x_hat), atol=1e-6)
    assert torch.allclose(model.decode_tokens(tokens), x_hat, atol=1e-5)


# ----------------------------------------------------------------------------- the prior

def test_prior_is_causal():
    """Catches a missing or off-by-one causal mask: logits[:, t] may depend on
    tokens[:, :t] only."""
    prior = tiny_prior(K=16, T=10)
    labels, tokens = torch.tensor([3, 7]), torch.randint(0, 16, (2, 10))
    base = prior(tokens, labels)
    assert base.shape == (2, 10, 16)                                     # logits (B, T, K)
    for s in range(10):
        changed = tokens.clone()
        changed[:, s] = (changed[:, s] + 1) % 16
        logits = prior(changed, labels)
        assert torch.equal(logits[:, :s + 1], base[:, :s + 1])          # blind to tokens >= t
        if s + 1 < 10:
            assert not torch.allclose(logits[:, s + 1], base[:, s + 1])  # ...but sees the past


def reference_sampler(prior, labels, temperature, top_k, generator):
    """The sampler written the slow, obvious way: full forward on the sequence so far."""
    tokens = torch.zeros(len(labels), prior.seq_len, dtype=torch.long)
    for t in range(prior.seq_len):
        logits = prior(tokens, labels)[:, t] / temperature
        if top_k:
            kth = logits.topk(top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        tokens[:, t] = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    return tokens


@pytest.mark.parametrize("top_k", [0, 2])
def test_sampler_matches_a_full_recompute_reference(top_k, monkeypatch):
    """Catches a sampler reading output position 0 (or t - 1) at every step, or
    ignoring top-k: each step's logits equal the full forward on the finished
    sequence (within 1e-5), and the same seeded generator gives the same tokens
    as the full-recompute sampler."""
    prior = tiny_prior(K=8, T=6)
    labels = torch.arange(300) % 10
    steps, draw = [], vqgan.draw_token
    monkeypatch.setattr(vqgan, "draw_token", lambda logits, *a: steps.append(logits) or draw(logits, *a))
    got = vqgan.sample_tokens(prior, labels, 0.7, top_k, torch.Generator().manual_seed(1))
    assert len(steps) == 6
    assert torch.allclose(torch.stack(steps, 1), prior(got, labels), atol=1e-5)
    want = reference_sampler(prior, labels, 0.7, top_k, torch.Generator().manual_seed(1))
    assert torch.equal(got, want)
    if top_k:   # every token lies among the top_k of its own position's logits
        top = prior(got, labels).topk(top_k, -1).indices
        assert (top == got[..., None]).any(-1).all()


@pytest.mark.parametrize("top_k", [0, 2])
def test_sampler_frequencies_match_the_priors_softmax_at_position_t(top_k):
    """Catches the sampler reading output position 0 at every step: after a fixed
    prefix (the commonest one), the frequencies of token t = 2 and t = 3 among the
    samples match softmax(logits[:, t] / temperature), restricted to the top k."""
    prior, temperature = tiny_prior(K=4, T=4), 0.4
    labels = torch.full((4000,), 3)
    tokens = vqgan.sample_tokens(prior, labels, temperature, top_k, torch.Generator().manual_seed(0))
    for t in (2, 3):
        prefixes, counts = tokens[:, :t].unique(dim=0, return_counts=True)
        prefix = prefixes[counts.argmax()]
        rows = (tokens[:, :t] == prefix).all(1)
        n = int(rows.sum())
        assert n >= 300
        freq = torch.bincount(tokens[rows, t], minlength=4).double() / n
        seq = torch.zeros(1, 4, dtype=torch.long)
        seq[0, :t] = prefix
        logits = prior(seq, labels[:1])[0, t].double() / temperature
        if top_k:
            logits[logits < logits.topk(top_k).values[-1]] = -math.inf
        p = logits.softmax(-1)
        assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 0.01), (t, freq, p)


def test_losses_fall_on_a_fixed_batch(tiny_mnist_dir):
    torch.manual_seed(0)
    x, y = mnist(tiny_mnist_dir, "train")
    x = x[:16]
    args = tiny_args("--lr", "3e-3")
    model, disc = tiny_models(args)
    opt_g = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    l1 = []
    for step in range(30):
        terms, x_hat, _ = vqgan.generator_step(model, disc, opt_g, x, **loss_kw(args, step >= 20))
        vqgan.discriminator_step(disc, opt_d, x, x_hat)
        l1.append(terms["l1"].item())
    assert np.mean(l1[-5:]) < 0.6 * np.mean(l1[:5])
    prior = tiny_prior(K=16, T=49, width=32, layers=2)
    prior.train()
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    tokens = torch.randint(0, 16, (8, 49))
    nll = []
    for _ in range(40):
        loss = vqgan.prior_nll(prior, tokens, y[:8])
        opt.zero_grad()
        loss.backward()
        opt.step()
        nll.append(loss.item())
    assert nll[0] == pytest.approx(math.log(16), rel=0.15) and nll[-1] < 0.5 * nll[0]


# ----------------------------------------------------------------------------- the command line

SMOKE = TINY[:-1] + ["1", "--dead-after", "1", "--batch-size", "16", "--prior-batch-size", "16"]


def test_cli_smoke_run_and_sample_only_beside_it(tiny_mnist_dir, tmp_path, capsys):
    """Every output; --sample-only writes into sample_only/ beside the checkpoint, never over
    the training run, and refuses a folder that holds a model.pt."""
    out = tmp_path / "run"
    common = ["--data-dir", str(tiny_mnist_dir), "--test-limit", "20", "--num-samples", "10"]
    metrics = vqgan.main(SMOKE + common + ["--downsample", "3", "--out", str(out), "--steps", "2"])
    for name in ("recon.png", "recon.npy", "samples.png", "samples.npy", "sample_labels.npy",
                 "model.pt", "metrics.json"):
        assert (out / name).is_file(), name
    samples, labels = np.load(out / "samples.npy"), np.load(out / "sample_labels.npy")
    assert samples.shape == (10, 1, 28, 28) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1
    assert labels.dtype == np.int64 and list(labels) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert np.load(out / "recon.npy").shape == (20, 1, 28, 28)
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test_recon_l1", "test_psnr_db", "codebook_usage", "codebook_perplexity",
                "test_prior_nll_bits", "train_seconds", "steps", "device", "test_images"):
        assert key in saved, key
    assert saved["tokenizer_steps"] == 2 and saved["prior_steps"] == 2 and saved == metrics
    weights = torch.load(out / "model.pt", weights_only=True)["model"].values()
    assert all(w.dtype == torch.float32 for w in weights if w.is_floating_point())   # bf16 only inside autocast
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    again = vqgan.main(common + ["--sample-only", "--ckpt", str(out / "model.pt")])   # the flags: the checkpoint's
    assert again["test_recon_l1"] == pytest.approx(saved["test_recon_l1"])
    assert again["test_prior_nll_bits"] == pytest.approx(saved["test_prior_nll_bits"])
    assert (out / "sample_only" / "samples.npy").is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(SystemExit) as e:
        vqgan.main(common + ["--sample-only", "--ckpt", str(out / "model.pt"), "--out", str(out)])
    assert "model.pt" in str(e.value.code) and "\n" not in str(e.value.code)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_your_own_images_of_another_size_and_three_channels(tmp_path):
    """Two steps on an unlabelled (N, C, H, W) uint8 array: the model takes C, H, W from the
    data, the prior one "no label" class, and no class labels are written."""
    data = tmp_path / "imgs.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (40, 3, 12, 16), dtype=np.uint8))
    out = tmp_path / "run"
    metrics = vqgan.main(TINY + ["--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "8",
                                 "--prior-batch-size", "8", "--num-samples", "5"])
    assert np.load(out / "samples.npy").shape == (5, 3, 12, 16)
    assert np.load(out / "recon.npy").shape == (4, 3, 12, 16)   # the last tenth is the test split
    assert not (out / "sample_labels.npy").exists() and metrics["test_images"] == 4
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["config"]["image_shape"] == [3, 12, 16] and ckpt["config"]["num_classes"] == 0
    np.save(tmp_path / "odd.npy", np.zeros((20, 14, 14), np.uint8))
    with pytest.raises(SystemExit) as e:
        vqgan.main(TINY + ["--data", str(tmp_path / "odd.npy"), "--out", str(tmp_path / "odd")])
    assert "divisible by 4" in str(e.value.code) and not (tmp_path / "odd").exists()


def test_a_smoke_run_tokenises_only_what_the_prior_reads(monkeypatch, tiny_mnist_dir, tmp_path):
    """Catches the whole training set tokenised for a prior that reads 2 batches (issue 26:
    67 s of a 2-step run)."""
    seen, encode = [], vqgan.encode
    monkeypatch.setattr(vqgan, "encode", lambda model, x, *a, **k: seen.append(len(x)) or encode(model, x, *a, **k))
    vqgan.main(SMOKE + ["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "o"), "--steps", "2",
                        "--prior-batch-size", "8", "--test-limit", "20", "--num-samples", "10"])
    assert seen == [2 * 8, 20]   # train: 2 steps of 8 images; test: --test-limit 20


@pytest.mark.parametrize("flag", ["--bf16", "--no-bf16"])
def test_training_steps_run_under_bf16_autocast_and_tokenising_and_scoring_do_not(flag, monkeypatch, tiny_mnist_dir,
                                                                                  tmp_path):
    """Catches autocast left off a training step (the default run's 10-minute budget needs it), or
    on around the tokenising and scoring (bf16 tokens would differ from the test set's), or on
    despite --no-bf16 (slow where the CPU emulates bf16)."""
    seen = {"generator_step": [], "prior_nll": [], "encode": []}
    for name, calls in seen.items():
        real = getattr(vqgan, name)
        spy = lambda *a, real=real, calls=calls, **k: calls.append(torch.is_autocast_enabled("cpu")) or real(*a, **k)
        monkeypatch.setattr(vqgan, name, spy)
    vqgan.main(SMOKE + ["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "o"), "--steps", "2",
                        "--test-limit", "20", "--num-samples", "10", flag])
    on = flag == "--bf16"
    assert seen == {"generator_step": [on, on], "prior_nll": [on, on, False], "encode": [False, False]}


def test_sampling_runs_at_one_thread_and_gives_the_callers_back(monkeypatch, tmp_path):
    """Catches the token loop left at the caller's thread count, or the count not restored."""
    threads, sample = [], vqgan.sample_tokens
    monkeypatch.setattr(vqgan, "sample_tokens", lambda *a, **k: threads.append(torch.get_num_threads()) or sample(*a, **k))
    args = tiny_args("--num-samples", "3")
    nets, caller = tiny_nets(args), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vqgan.evaluate_and_sample(args, nets["tokenizer"], nets["prior"], 10, torch.rand(4, 1, 28, 28) * 2 - 1,
                                  torch.arange(4), tmp_path, CPU)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(caller)
    assert threads == [1] and np.load(tmp_path / "samples.npy").shape == (3, 1, 28, 28)


def test_help_reads_the_right_way_round(capsys):
    with pytest.raises(SystemExit):
        vqgan.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--gan, --no-gan" in text and "--no-gan (default: True)" not in text
    description = text.split("\n\n")[1]
    assert description.startswith("VQGAN:") and description.rstrip().endswith(".")
    options = text.split("options:")[1].split("\n  -")[2:]      # every flag but --help
    assert options and all("(default:" in o for o in options), [o for o in options if "(default:" not in o]


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "--lr"), (["--prior-lr", "nan"], "--prior-lr"),
    (["--beta", "-0.1"], "--beta"), (["--disc-weight", "-1"], "--disc-weight"),
    (["--top-k", "-1"], "--top-k"), (["--temperature", "0"], "--temperature"),
    (["--codebook-size", "0"], "--codebook-size"), (["--downsample", "5"], "--downsample"),
    (["--width", "12"], "--width"), (["--prior-width", "30"], "--prior-width"),
    (["--dead-after", "-1"], "--dead-after"), (["--sample-only"], "--ckpt"),
    (["--sample-only", "--ckpt", "m.pt", "--codebook-size", "32"], "--codebook-size")])
def test_bad_flags_get_usage_and_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        vqgan.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def broken_checkpoints(tmp_path):
    """A valid tiny checkpoint's config and weights, saved broken in several ways."""
    args = tiny_args()
    nets = tiny_nets(args)
    cfg, state = {"image_shape": [1, 28, 28], "num_classes": 10,
                  **{k: getattr(args, k) for k in vqgan.MODEL_FLAGS}}, nets.state_dict()
    cases = {}
    for name, c, weights in (
            ("missing key", {k: v for k, v in cfg.items() if k != "width"}, state),
            ("wrong type", {**cfg, "codebook_size": "16"}, state),
            ("out of range", {**cfg, "width": 12}, state),
            ("weights", {**cfg, "codebook_size": 32}, state),
            ("other data", {**cfg, "image_shape": [1, 32, 32]}, tiny_nets(args, (1, 32, 32)).state_dict()),
            ("no tokenizer", cfg, {k: v for k, v in state.items() if not k.startswith("tokenizer.")})):
        vqgan.save_checkpoint(tmp_path / f"{name}.pt", c, weights)
        cases[name] = tmp_path / f"{name}.pt"
    cases["not a checkpoint"] = tmp_path / "junk.pt"
    cases["not a checkpoint"].write_bytes(b"not a checkpoint")
    cases["truncated"] = tmp_path / "truncated.pt"
    cases["truncated"].write_bytes((tmp_path / "weights.pt").read_bytes()[:3000])
    torch.save({"script": "vqvae", "config": cfg, "model": state}, tmp_path / "other.pt")
    cases["another script's"] = tmp_path / "other.pt"
    return cases


def test_bad_files_and_states_fail_in_one_line_leaving_nothing(tiny_mnist_dir, tmp_path):
    """Catches tracebacks from deep inside torch on a broken checkpoint, a batch larger than
    the training set, missing data, and --out naming a file."""
    common = ["--data-dir", str(tiny_mnist_dir), "--test-limit", "20", "--num-samples", "10"]
    runs = [SMOKE + ["--steps", "1"] + extra for extra in (
        ["--out", str(tmp_path / "file")], ["--batch-size", "65"], ["--prior-batch-size", "100"],
        ["--data-dir", str(tmp_path / "nowhere")], ["--data", str(tmp_path / "none.npy")])]
    (tmp_path / "file").write_text("mine")
    runs += [["--sample-only", "--ckpt", str(path)] for path in broken_checkpoints(tmp_path).values()]
    for i, extra in enumerate(runs):
        out = tmp_path / f"out{i}"
        with pytest.raises(SystemExit) as e:
            vqgan.main(common + ["--out", str(out)] + extra)
        message = str(e.value.code)
        assert message.startswith("error: ") and "\n" not in message, (extra, message)
        assert not out.exists() or not any(out.iterdir()), extra
    assert (tmp_path / "file").read_text() == "mine"
