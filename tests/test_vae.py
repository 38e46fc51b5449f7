"""Tests of vae.py: the closed forms against torch and Monte Carlo, the
reparametrisation, the importance-weighted bound against an exact likelihood and a
naive reference, the schedule and the loop, and the CLI end to end (bad input too)."""

import argparse
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

import vae


@pytest.fixture(scope="module")
def trained_model():
    """A small VAE after 150 Adam steps on 512 real digits: far from converged, so
    the ELBO is loose and the importance-weighted bound has room to tighten."""
    torch.manual_seed(0)
    x, _ = vae.mnist_tensors(vae.HERE / "data" / "mnist", "test")
    x = x[:512].flatten(1)
    model = vae.VAE(z_dim=8, hidden=64)
    model.init_output_bias(x.mean(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        recon, kl = vae.elbo_terms(model, vae.binarize(x))
        loss = (recon + kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x_fixed = vae.fixed_test_set(x[:32].view(-1, 1, 28, 28), "bernoulli")
    return model, x_fixed


# ----------------------------------------------------------------------------- KL

def test_kl_closed_form_matches_torch_distributions():
    mu, logvar = torch.randn(16, 5), torch.randn(16, 5)
    ours = vae.gaussian_kl(mu, logvar)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_kl_closed_form_matches_monte_carlo():
    mu = torch.tensor([0.7, -1.2, 0.1])
    logvar = torch.tensor([0.5, -1.0, 0.0])
    z = vae.reparametrize(mu.expand(200_000, 3), logvar.expand(200_000, 3))
    # KL = E_q[log q(z) - log p(z)], estimated from samples of q
    terms = (vae.log_normal(z, mu, logvar)
             - vae.log_normal(z, torch.zeros(3), torch.zeros(3))).double()
    estimate, se = terms.mean().item(), terms.std().item() / math.sqrt(len(terms))
    assert abs(estimate - vae.gaussian_kl(mu, logvar).item()) < 4 * se


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zero = torch.zeros(1, 4)
    assert vae.gaussian_kl(zero, zero).item() == 0.0
    for mu, logvar in ((zero + 0.1, zero), (zero, zero + 0.1), (zero, zero - 0.1),
                       (torch.randn(1, 4), torch.randn(1, 4))):
        assert vae.gaussian_kl(mu, logvar).item() > 0


def test_log_normal_matches_torch():
    z, mu, logvar = torch.randn(7, 3), torch.randn(7, 3), torch.randn(7, 3)
    ref = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(vae.log_normal(z, mu, logvar), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- likelihoods

def test_bernoulli_log_likelihood_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    x = torch.tensor([[1.0, 0.0, 1.0]])

    def sigmoid(a):
        return 1 / (1 + math.exp(-a))

    by_hand = math.log(sigmoid(0.0)) + math.log(1 - sigmoid(2.0)) + math.log(sigmoid(-1.0))
    assert vae.bernoulli_log_likelihood(logits, x).item() == pytest.approx(by_hand, abs=1e-6)
    # Saturated logits stay finite: a confident wrong pixel costs |logit| nats.
    far = vae.bernoulli_log_likelihood(torch.tensor([[100.0]]), torch.tensor([[0.0]]))
    assert far.item() == pytest.approx(-100.0, abs=1e-4)


def test_gaussian_log_likelihood_matches_torch():
    mean, x = torch.rand(4, 10), torch.rand(4, 10)
    ref = Normal(mean, 0.1).log_prob(x).sum(-1)
    torch.testing.assert_close(vae.gaussian_log_likelihood(mean, x, 0.1), ref)


def test_binarisation_is_dynamic_for_training_and_fixed_for_test():
    x = torch.full((1, 1, 28, 28), 0.3)
    a, b = vae.binarize(x), vae.binarize(x)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)
    assert vae.binarize(x.expand(100, 1, 28, 28)).mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.equal(vae.fixed_test_set(x, "bernoulli"), vae.fixed_test_set(x, "bernoulli"))


# ----------------------------------------------------------------------------- reparametrisation

def test_reparametrised_sample_has_the_right_mean_and_variance():
    mu = torch.tensor([1.0, -2.0])
    logvar = torch.tensor([0.0, math.log(0.25)])
    z = vae.reparametrize(mu.expand(100_000, 2), logvar.expand(100_000, 2))
    torch.testing.assert_close(z.mean(0), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), logvar.exp(), atol=0.02, rtol=0)


def test_gradients_reach_mu_and_logvar():
    mu = torch.tensor([0.5, -1.0], requires_grad=True)
    logvar = torch.tensor([0.2, -0.4], requires_grad=True)
    eps = torch.tensor([1.5, -0.3])
    vae.reparametrize(mu, logvar, eps).sum().backward()
    # dz/dmu = 1, dz/dlogvar = 0.5 * exp(0.5 * logvar) * eps
    torch.testing.assert_close(mu.grad, torch.ones(2))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


# ----------------------------------------------------------------------------- the bounds

def test_iwae_with_one_sample_is_the_elbo_in_expectation(trained_model):
    """k = 1 uses a sampled KL, log Q(z|x) - log P(z), where the ELBO uses the closed
    form: the same expectation. Paired image by image, so only the sampling noise
    (not the spread between images) sets the tolerance."""
    model, x = trained_model
    with torch.no_grad():
        iw = torch.stack([vae.iwae_log_likelihood(model, x, k=1) for _ in range(400)])
        elbo = torch.stack([-sum(vae.elbo_terms(model, x)) for _ in range(400)])
    d = (iw - elbo).flatten()                                    # (400 * B,)
    se = d.std().item() / math.sqrt(len(d))
    assert abs(d.mean().item()) < 4 * se, (d.mean().item(), se)


def test_iwae_bound_does_not_decrease_with_k(trained_model):
    model, x = trained_model
    bounds, errors = [], []
    with torch.no_grad():
        for k in (1, 10, 100):
            torch.manual_seed(1)
            est = torch.stack([vae.iwae_log_likelihood(model, x, k).mean() for _ in range(20)])
            bounds.append(est.mean().item())
            errors.append(est.std().item() / math.sqrt(len(est)))
    for lo, hi, e_lo, e_hi in zip(bounds, bounds[1:], errors, errors[1:]):
        assert hi > lo - 3 * (e_lo + e_hi), bounds
    # and it does tighten visibly on a model this loosely fitted
    assert bounds[-1] - bounds[0] > 1.0, bounds


QUAD_TRAIN_STEPS = 300   # Adam steps of the planar model
QUAD_TOLERANCE = 0.03    # nats: how far from log P(x) the k = 5000 estimate may sit


@pytest.fixture(scope="module")
def planar_model():
    """A VAE with a 2-dimensional latent and a tiny decoder (16 units), briefly trained
    on 512 real digits, and 16 fixed test images: small enough that log P(x) is an
    integral over the plane that quadrature computes exactly."""
    torch.manual_seed(0)
    x, _ = vae.mnist_tensors(vae.HERE / "data" / "mnist", "test")
    x = x[:512].flatten(1)
    model = vae.VAE(z_dim=2, hidden=16)
    model.init_output_bias(x.mean(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(QUAD_TRAIN_STEPS):
        recon, kl = vae.elbo_terms(model, vae.binarize(x))
        loss = (recon + kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, vae.fixed_test_set(x[:16].view(-1, 1, 28, 28), "bernoulli")


def exact_log_likelihood(model, x, lim=6.0, n=241):
    """log P(x) = log integral P_D(x|z) N(z; 0, I) dz over the square [-lim, lim]^2, in
    float64, by the rectangle rule on an n x n grid of spacing h: (B,). Also returns
    the same rule on every other point (spacing 2h), and the log of the share of the
    integral that lies within 1 of the square's edge: when the two rules agree and the
    edge holds nothing, the grid resolves the posterior and the square holds it."""
    model = copy.deepcopy(model).double()
    x = x.double()
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    h = (g[1] - g[0]).item()
    log_f = []
    with torch.no_grad():
        for z in torch.cartesian_prod(g, g).split(20_000):     # (G, 2), z[:, 0] slow
            logits = model.decode(z)                             # (G, D)
            # log P_D(x|z) = sum_d x_d l_d - softplus(l_d);  log N(z) = -|z|^2/2 - log 2pi
            log_px = x @ logits.T - F.softplus(logits).sum(-1)   # (B, G)
            log_f.append(log_px - 0.5 * z.pow(2).sum(-1) - math.log(2 * math.pi))
    log_f = torch.cat(log_f, 1).view(-1, n, n)
    fine = torch.logsumexp(log_f.flatten(1), 1) + 2 * math.log(h)
    coarse = torch.logsumexp(log_f[:, ::2, ::2].flatten(1), 1) + 2 * math.log(2 * h)
    near = g.abs() > lim - 1
    edge = torch.logsumexp(log_f[:, near[:, None] | near[None, :]], 1) + 2 * math.log(h)
    return fine, coarse, edge - fine


def test_iwae_at_large_k_sits_just_below_the_exact_log_likelihood(planar_model):
    """Catches the IWAE estimate without its `- log k` (off by log 5000 = 8.5 nats), a
    `- log chunk`, a mean of log-weights in place of their logsumexp, and any wrong term
    in the weights (prior, Q or decoder at the wrong z, a sign): with a 2-D latent log
    P(x) is exact by quadrature, and the k = 5000 estimate, a lower bound in expectation
    that tightens with k, must sit on it. Medians over the 16 images, as a few images
    have heavy-tailed weights (Q narrower than the posterior) and a noisy estimate."""
    model, x = planar_model
    exact, coarse, edge_share = exact_log_likelihood(model, x)
    torch.testing.assert_close(exact, coarse, atol=1e-5, rtol=0)  # the grid resolves it
    assert edge_share.max().item() < -20                          # the square holds it
    with torch.no_grad():
        est = torch.stack([vae.iwae_log_likelihood(model, x, k=5000) for _ in range(4)])
        elbo = torch.stack([vae.iwae_log_likelihood(model, x, k=1) for _ in range(100)])
    gap = (exact - est.double().mean(0)).median().item()          # exact - estimate
    assert -QUAD_TOLERANCE < gap < QUAD_TOLERANCE, gap
    elbo_gap = (exact - elbo.double().mean(0)).median().item()
    assert elbo_gap > 10 * QUAD_TOLERANCE, elbo_gap               # k = 1 is visibly below


def test_iwae_in_chunks_equals_a_naive_sum_over_samples():
    """Catches a chunk dropped or counted twice (k = 7 in chunks of 3), the prior or Q
    evaluated at the wrong z, a lost `- log k`: the chunked, batched estimate against
    one log-weight at a time from torch.distributions, on the same noise."""
    torch.manual_seed(0)
    model = vae.VAE(z_dim=3, hidden=16)
    x = vae.binarize(torch.rand(4, vae.D))
    k, eps = 7, torch.randn(7, 4, 3)
    with torch.no_grad():
        fast = vae.iwae_log_likelihood(model, x, k, chunk=3, eps=eps)
        mu, logvar = model.encode(x)
        naive = []
        for b in range(len(x)):
            q = Normal(mu[b], torch.exp(0.5 * logvar[b]))
            log_w = []
            for j in range(k):
                z = mu[b] + torch.exp(0.5 * logvar[b]) * eps[j, b]
                log_w.append(Bernoulli(logits=model.decode(z)).log_prob(x[b]).sum()
                             + Normal(0.0, 1.0).log_prob(z).sum() - q.log_prob(z).sum())
            naive.append(torch.logsumexp(torch.stack(log_w), 0) - math.log(k))
    torch.testing.assert_close(fast, torch.stack(naive), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- model and training

def test_shapes():
    model = vae.VAE(z_dim=3, hidden=16)
    x = torch.rand(5, vae.D)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 3)
    assert model.decode(torch.randn(7, 5, 3)).shape == (7, 5, vae.D)
    recon, kl = vae.elbo_terms(model, x)
    assert recon.shape == kl.shape == (5,)
    assert vae.iwae_log_likelihood(model, x, k=7, chunk=3).shape == (5,)
    assert vae.sample(model, 6, "cpu").shape == (6, 1, 28, 28)
    assert vae.interpolate(model, x[:2], x[2:4], "cpu", steps=4).shape == (8, 1, 28, 28)
    assert vae.manifold(vae.VAE(z_dim=2, hidden=16), "cpu", n=5).shape == (25, 1, 28, 28)


def test_loss_falls_on_a_fixed_batch(mnist_dir):
    torch.manual_seed(0)
    x, _ = vae.mnist_tensors(mnist_dir, "test")
    x = vae.fixed_test_set(x[:64], "bernoulli")
    model = vae.VAE(z_dim=8, hidden=128)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        recon, kl = vae.elbo_terms(model, x)
        loss = (recon + kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:3], losses[-3:])


def test_cosine_lr_multiplier():
    """Catches a schedule that does not start at 1, end at 0 or pass 0.5 half way, and
    a warm-up that is not linear from 1/warmup up to 1."""
    assert vae.cosine_lr(0, 100) == 1.0
    assert vae.cosine_lr(50, 100) == pytest.approx(0.5)
    assert vae.cosine_lr(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert [vae.cosine_lr(s, 10, warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert vae.cosine_lr(4, 10, warmup=4) == 1.0
    assert vae.cosine_lr(7, 10, warmup=4) == pytest.approx(0.5)
    values = [vae.cosine_lr(s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def train_args(**changes):
    args = dict(batch_size=16, epochs=3, steps=0, lr=1e-3, schedule="cosine")
    return argparse.Namespace(**{**args, **changes})


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_training_steps_at_the_scheduled_learning_rate(monkeypatch, schedule):
    """Catches a schedule computed but never applied, applied one step late, or
    counted over the wrong total: the optimizer's lr at each of the 3 x 4 steps is
    recorded and must be lr * cosine_lr(step, 12) (or lr throughout)."""
    seen, real_step = [], torch.optim.Adam.step

    def spy(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    model = vae.VAE(z_dim=2, hidden=8)
    steps = vae.train(model, torch.rand(64, vae.D), train_args(schedule=schedule), "cpu")
    factors = [vae.cosine_lr(s, 12) if schedule == "cosine" else 1.0 for s in range(12)]
    assert steps == 12 and seen == pytest.approx([1e-3 * f for f in factors], rel=1e-12)
    seen.clear()
    assert vae.train(model, torch.rand(64, vae.D), train_args(steps=5), "cpu") == len(seen) == 5


def test_minibatches_cover_each_epoch_once_and_stop_at_the_total():
    """Catches overlapping or skipped slices, a partial last batch, an order that is
    not redrawn every epoch, and a loop that runs past `total`."""
    torch.manual_seed(0)
    batches = list(vae.minibatches(10, 3, 7, "cpu"))
    assert len(batches) == 7 and all(len(b) == 3 for b in batches)
    epochs = [torch.cat(batches[i:i + 3]).tolist() for i in (0, 3)]
    assert all(len(set(e)) == 9 for e in epochs) and epochs[0] != epochs[1]


def test_training_stops_on_a_non_finite_loss():
    """Catches a loop that never checks its loss now that it reads it only on logged
    steps: one NaN pixel makes the loss NaN, and training must stop with a RunError."""
    x = torch.rand(64, vae.D)
    x[5, 3] = float("nan")
    model = vae.VAE(z_dim=2, hidden=8, likelihood="gaussian")
    with pytest.raises(vae.RunError, match="non-finite loss"):
        vae.train(model, x, train_args(epochs=100), "cpu", log_every=5)


def test_manifold_grid_holds_the_normal_quantiles():
    """Catches erfinv(u) for erfinv(2u - 1), a missing sqrt 2, or a flipped axis: the
    grid's coordinates are the standard normal's quantiles at (i + 1/2) / n, z2 up."""
    n = 5
    z = vae.normal_quantile_grid(n)
    q = Normal(0.0, 1.0).icdf((torch.arange(n) + 0.5) / n)
    torch.testing.assert_close(z[:n, 0], q)                       # first row: z1 left to right
    torch.testing.assert_close(z[::n, 1], q.flip(0))              # first column: z2 top down


# ----------------------------------------------------------------------------- CLI

def smoke_args(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--out", str(out), "--steps", "2", "--hidden", "32",
            "--test-limit", "8", "--iw-samples", "4", "--num-samples", "8", "--device", "cpu",
            *extra]


def sample_only_args(data_dir, out, ckpt, *extra):
    return ["--data-dir", str(data_dir), "--out", str(out), "--sample-only", "--ckpt", str(ckpt),
            "--steps", "2", "--test-limit", "8", "--iw-samples", "4", "--num-samples", "8",
            "--device", "cpu", *extra]


def last_json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_smoke_run_writes_every_output_and_sample_only_reloads(tiny_mnist_dir, tmp_path, capsys):
    """Also catches a --sample-only evaluation written over the training run's
    metrics.json: it goes to eval_metrics.json (and stdout) in the same folder."""
    out = tmp_path / "run"
    metrics = vae.main(smoke_args(tiny_mnist_dir, out))
    for name in ("samples.png", "samples.npy", "recon.png", "interp.png", "model.pt",
                 "metrics.json"):
        assert (out / name).is_file(), name
    assert not (out / "manifold.png").exists()          # only for a 2-D latent
    assert not (out / "eval_metrics.json").exists()
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = np.load(out / "samples.npy")
    assert samples.shape == (8, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test_neg_elbo_nats", "test_recon_nats", "test_kl_nats", "test_nll_nats",
                "test_bits_per_dim", "iw_samples", "train_seconds", "steps", "device",
                "judge_test_accuracy", "judge_n", "sample_fd", "sample_score", "recon_fd",
                "anchor_real_fd", "anchor_binarised_fd", "anchor_noise_fd"):
        assert key in saved, key
    assert saved["steps"] == 2 and saved["iw_samples"] == 4 and saved["judge_n"] == 8
    assert saved["test_neg_elbo_nats"] == pytest.approx(saved["test_recon_nats"]
                                                        + saved["test_kl_nats"])
    assert last_json_line(capsys) == metrics == saved

    training_metrics = (out / "metrics.json").read_bytes()
    reloaded = vae.main(sample_only_args(tiny_mnist_dir, out, out / "model.pt",
                                         "--iw-samples", "6"))
    assert (out / "metrics.json").read_bytes() == training_metrics
    assert json.loads((out / "eval_metrics.json").read_text()) == reloaded == last_json_line(capsys)
    assert reloaded["steps"] == 0 and reloaded["iw_samples"] == 6
    assert math.isfinite(reloaded["test_nll_nats"])
    np.testing.assert_array_equal(np.load(out / "samples.npy"), samples)  # same weights, noise


def test_the_test_set_is_the_same_whatever_the_seed(tiny_mnist_dir, tmp_path, monkeypatch):
    """Catches the fixed test binarisation following --seed (a generator seeded with
    it, or the global stream that seed_everything sets): the images that two runs with
    different seeds evaluate on must be bit-identical binary images."""
    seen, real_evaluate = [], vae.evaluate

    def spy(model, x, *a, **kw):
        seen.append(x.clone())
        return real_evaluate(model, x, *a, **kw)

    monkeypatch.setattr(vae, "evaluate", spy)
    for seed in (0, 1):
        vae.main(smoke_args(tiny_mnist_dir, tmp_path / f"seed{seed}", "--seed", str(seed)))
    vae.main(sample_only_args(tiny_mnist_dir, tmp_path / "again", tmp_path / "seed0" / "model.pt",
                              "--seed", "7"))
    assert len(seen) == 3 and seen[0].shape == (8, vae.D)
    assert set(seen[0].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])


def test_cli_two_dimensional_latent_writes_the_manifold(tiny_mnist_dir, tmp_path):
    vae.main(smoke_args(tiny_mnist_dir, tmp_path, "--z-dim", "2"))
    assert (tmp_path / "manifold.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags", [
    ["--lr", "-1"], ["--lr", "0"], ["--lr", "nan"], ["--lr", "inf"], ["--epochs", "0"],
    ["--batch-size", "0"], ["--z-dim", "0"], ["--hidden", "-3"], ["--sigma", "0"],
    ["--iw-samples", "0"], ["--num-samples", "0"], ["--steps", "-1"], ["--test-limit", "-1"],
    ["--seed", "-1"], ["--seed", str(2 ** 32)], ["--epochs", "1.5"], ["--sample-only"],
    ["--ckpt", "model.pt"], ["--likelihood", "poisson"], ["--schedule", "linear"],
    ["--device", "tpu"], ["--no-such-flag"],
])
def test_bad_flags_get_usage_and_one_error_line(flags, capsys):
    """Catches a flag left out of the validation table (it would reach training)."""
    with pytest.raises(SystemExit) as e:
        vae.parse_args(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and len([l for l in err.splitlines() if "error:" in l]) == 1


def tiny_checkpoint(path, **config_changes):
    """A vae.py checkpoint of a tiny model (z_dim 2, hidden 8); config_changes damage it."""
    model = vae.VAE(z_dim=2, hidden=8)
    config = {"z_dim": 2, "hidden": 8, "likelihood": "bernoulli", "sigma": 0.1}
    ckpt = {"script": "vae", "model": model.state_dict(), "config": {**config, **config_changes}}
    torch.save(ckpt, path)
    return ckpt


def damage(kind, path):
    if kind == "not a checkpoint":
        path.write_bytes(b"not a checkpoint")
    elif kind == "another script's":
        torch.save({"script": "autoencoder", "model": {}, "config": {}}, path)
    elif kind == "no config":
        ckpt = tiny_checkpoint(path)
        del ckpt["config"]
        torch.save(ckpt, path)
    elif kind == "z_dim not an int":
        tiny_checkpoint(path, z_dim="2")
    elif kind == "z_dim zero":
        tiny_checkpoint(path, z_dim=0)
    elif kind == "unknown likelihood":
        tiny_checkpoint(path, likelihood="poisson")
    elif kind == "config larger than weights":
        tiny_checkpoint(path, hidden=10 ** 9)       # building this model would take 6 TB
    elif kind == "weights of another shape":
        ckpt = tiny_checkpoint(path)
        ckpt["model"]["encoder.0.weight"] = torch.zeros(8, 10)
        torch.save(ckpt, path)
    elif kind == "weights missing a tensor":
        ckpt = tiny_checkpoint(path)
        del ckpt["model"]["decoder.4.bias"]
        torch.save(ckpt, path)


@pytest.mark.parametrize("kind", [
    "not a checkpoint", "another script's", "no config", "z_dim not an int", "z_dim zero",
    "unknown likelihood", "config larger than weights", "weights of another shape",
    "weights missing a tensor", "missing file", "out is a file"])
def test_bad_files_fail_in_one_line_and_write_nothing(kind, tiny_mnist_dir, tmp_path):
    """Catches a checkpoint config read without checks (a KeyError or TypeError from
    deep inside, or a model of 10^9 units built before its weights are looked at), and
    an --out that is a file: each ends in one line `error: ...`, nothing written."""
    ckpt, out = tmp_path / "ckpt" / "model.pt", tmp_path / "out"
    ckpt.parent.mkdir()
    if kind == "out is a file":
        out.write_text("mine")
        tiny_checkpoint(ckpt)
    elif kind != "missing file":
        damage(kind, ckpt)
    with pytest.raises(SystemExit) as e:
        vae.main(sample_only_args(tiny_mnist_dir, out, ckpt))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    if kind == "out is a file":
        assert out.read_text() == "mine"
    else:
        assert list(out.iterdir()) == []
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ([] if kind == "missing file"
                                                            else ["model.pt"])


def test_cli_gaussian_likelihood_runs(tiny_mnist_dir, tmp_path):
    metrics = vae.main(smoke_args(tiny_mnist_dir, tmp_path, "--likelihood", "gaussian"))
    assert metrics["likelihood"] == "gaussian" and math.isfinite(metrics["test_nll_nats"])
    reloaded = vae.main(sample_only_args(tiny_mnist_dir, tmp_path / "again",
                                         tmp_path / "model.pt"))
    assert reloaded["likelihood"] == "gaussian"
