"""Tests of vae.py: the closed forms against torch and Monte Carlo, the
reparametrisation, the importance-weighted bound, and the CLI end to end."""

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

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


# ----------------------------------------------------------------------------- CLI

def smoke_args(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--out", str(out), "--steps", "2", "--hidden", "32",
            "--test-limit", "8", "--iw-samples", "4", "--num-samples", "8", "--device", "cpu",
            *extra]


def test_cli_smoke_run_writes_every_output_and_sample_only_reloads(tiny_mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = vae.main(smoke_args(tiny_mnist_dir, out))
    for name in ("samples.png", "samples.npy", "recon.png", "interp.png", "model.pt",
                 "metrics.json"):
        assert (out / name).is_file(), name
    assert not (out / "manifold.png").exists()          # only for a 2-D latent
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = np.load(out / "samples.npy")
    assert samples.shape == (8, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test_neg_elbo_nats", "test_recon_nats", "test_kl_nats", "test_nll_nats",
                "test_bits_per_dim", "iw_samples", "train_seconds", "steps", "device"):
        assert key in saved, key
    assert saved["steps"] == 2 and saved["iw_samples"] == 4
    assert saved["test_neg_elbo_nats"] == pytest.approx(saved["test_recon_nats"]
                                                        + saved["test_kl_nats"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics

    again = tmp_path / "again"
    reloaded = vae.main(["--data-dir", str(tiny_mnist_dir), "--out", str(again), "--sample-only",
                         "--ckpt", str(out / "model.pt"), "--test-limit", "8", "--iw-samples",
                         "4", "--num-samples", "8", "--device", "cpu"])
    assert reloaded["steps"] == 0 and math.isfinite(reloaded["test_nll_nats"])
    np.testing.assert_array_equal(np.load(again / "samples.npy"), samples)  # same weights, noise


def test_cli_two_dimensional_latent_writes_the_manifold(tiny_mnist_dir, tmp_path):
    vae.main(smoke_args(tiny_mnist_dir, tmp_path, "--z-dim", "2"))
    assert (tmp_path / "manifold.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_fails_in_one_line(tiny_mnist_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        vae.main(["--sample-only"])
    assert e.value.code == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        vae.main(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "o"),
                  "--sample-only", "--ckpt", str(bad)])
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
    other = tmp_path / "other.pt"
    torch.save({"script": "autoencoder", "model": {}, "config": {}}, other)
    with pytest.raises(SystemExit) as e:
        vae.main(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "o"),
                  "--sample-only", "--ckpt", str(other)])
    assert "not of vae.py" in str(e.value.code)


def test_cli_gaussian_likelihood_runs(tiny_mnist_dir, tmp_path):
    metrics = vae.main(smoke_args(tiny_mnist_dir, tmp_path, "--likelihood", "gaussian"))
    assert metrics["likelihood"] == "gaussian" and math.isfinite(metrics["test_nll_nats"])
    reloaded = vae.main(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "again"),
                         "--sample-only", "--ckpt", str(tmp_path / "model.pt"), "--test-limit",
                         "8", "--iw-samples", "4", "--num-samples", "8", "--device", "cpu"])
    assert reloaded["likelihood"] == "gaussian"
