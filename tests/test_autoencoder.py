"""autoencoder.py: the model on any image size, the code Gaussian and its distances, and the
command line end to end (own data, --sample-only, bad input in one line)."""

import argparse
import json

import numpy as np
import pytest
import torch

import autoencoder as ae


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 12, 16)])
def test_shapes_through_encoder_and_decoder(shape):
    model = ae.AutoEncoder(z_dim=16, width=8, image_shape=shape)
    x = torch.rand(5, *shape)
    assert model(x).shape == (5, *shape)                     # forward: the reconstruction
    assert model.encoder(x).shape == (5, 16)
    decoded = model.decode(torch.randn(3, 16) * 100)
    assert decoded.shape == (3, *shape) and decoded.min() >= 0 and decoded.max() <= 1
    assert ae.sample(model, 4).shape == (4, *shape)


def test_every_parameter_gets_a_finite_gradient():
    model = ae.AutoEncoder(z_dim=8, width=8)
    x = torch.rand(4, 1, 28, 28)
    ae.reconstruction_loss(model(x), x).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_reconstruction_losses_are_what_they_say():
    x, x_hat = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    assert ae.reconstruction_loss(x_hat, x, "l1").item() == pytest.approx(2.5 / 4)
    assert ae.reconstruction_loss(x_hat, x, "l2").item() == pytest.approx(2.25 / 4)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_loss_falls_on_a_fixed_batch(mnist_dir, loss):
    x = ae.load_images("mnist", mnist_dir, "test")[0][:32]
    model = ae.AutoEncoder(z_dim=16, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(100):
        value = ae.reconstruction_loss(model(x), x, loss)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    # An all-black output already scores mean(x) (L1), the trap an L1 auto-encoder
    # falls into first; the model must get clearly past it.
    assert losses[-1] < 0.6 * losses[0]
    assert losses[-1] < 0.7 * ae.reconstruction_loss(torch.zeros_like(x), x, loss).item()


def correlated_codes(n=5000, seed=1):
    """Codes (n, 3) with strong correlations (|corr| up to about 0.9), like a trained encoder's."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [-0.6, 0.3, 0.2]])
    return torch.randn(n, 3, generator=gen) @ A.T + torch.tensor([1.0, -2.0, 0.5])


def model_with_gaussian_of(codes):
    model = ae.AutoEncoder(z_dim=3, width=1)
    model.z_mean[:], model.z_chol[:] = ae.code_gaussian(codes)
    return model


def test_code_gaussian_is_the_mean_and_covariance_of_the_codes():
    """Bug caught: a biased or mis-centred covariance, or L^T stored in place of L."""
    codes = correlated_codes()
    m, L = ae.code_gaussian(codes)
    assert torch.allclose(m, codes.mean(0), atol=1e-5)
    assert torch.allclose(L @ L.T, torch.cov(codes.T), atol=1e-5)
    assert torch.equal(L, L.tril())


def test_random_codes_follow_the_full_covariance_of_the_codes():
    """Bug caught: random codes drawn from the diagonal Gaussian (per-dimension std only, the
    correlations dropped), or z = m + L^T eps; --codes diag does drop them, and only them."""
    codes = correlated_codes()
    model = model_with_gaussian_of(codes)
    z = ae.random_codes(model, 40000, seed=3)
    assert torch.allclose(z.mean(0), codes.mean(0), atol=0.03)
    assert torch.allclose(torch.cov(z.T), torch.cov(codes.T), atol=0.03)
    cov_diag = torch.cov(ae.random_codes(model, 40000, seed=3, diagonal=True).T)
    assert torch.allclose(cov_diag.diagonal(), torch.cov(codes.T).diagonal(), atol=0.03)
    assert (cov_diag - torch.diag(cov_diag.diagonal())).abs().max() < 0.03
    # sample() decodes exactly these codes
    assert torch.equal(ae.sample(model, 5, seed=3), model.decode(ae.random_codes(model, 5, seed=3)))


def test_mahalanobis_distance_is_the_quadratic_form():
    """Bug caught: S in place of S^-1 (|L^T (z - m)|^2), the wrong triangle solved, or the
    mean not subtracted. Exact: the quadratic form with an explicit inverse; d^2 of
    m + L eps is |eps|^2; the codes the Gaussian was fitted to average Z (N - 1) / N."""
    codes = correlated_codes(n=1000)
    model = model_with_gaussian_of(codes)
    m, L = model.z_mean, model.z_chol
    z = torch.randn(7, 3) * 3
    S_inv = torch.linalg.inv((L @ L.T).double())
    explicit = (((z - m).double() @ S_inv) * (z - m).double()).sum(1)
    assert torch.allclose(ae.mahalanobis_sq(z, m, L), explicit, rtol=1e-5)
    samples = ae.random_codes(model, 5000, seed=4)
    eps = torch.randn(5000, 3, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(ae.mahalanobis_sq(samples, m, L), eps.double().pow(2).sum(1),
                          rtol=1e-4, atol=1e-4)
    assert ae.mahalanobis_sq(codes, m, L).mean().item() == pytest.approx(3 * 999 / 1000, rel=1e-4)


def test_interpolation_starts_and_ends_at_the_endpoints():
    model = ae.AutoEncoder(z_dim=4, width=8)
    x_a, x_b = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    path = ae.interpolate(model, x_a, x_b, steps=5).view(2, 5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(path[:, 0], model.decode(model.encoder(x_a)), atol=1e-6)
        assert torch.allclose(path[:, -1], model.decode(model.encoder(x_b)), atol=1e-6)


# ----------------------------------------------------------------------------- command line

def smoke_args(out, data_dir, *extra):
    return ["--steps", "2", "--batch-size", "16", "--z-dim", "8", "--num-samples", "8",
            "--out", str(out), "--data-dir", str(data_dir), *extra]


def test_cli_smoke_run_writes_every_output_and_sample_only_writes_beside_it(
        tmp_path, tiny_mnist_dir, capsys):
    """Bugs caught: hard-coded test indices that fail on a test set of 20 images; --sample-only
    with the default --out writing over the training run's outputs (issue 26)."""
    out = tmp_path / "run"
    metrics = ae.main(smoke_args(out, tiny_mnist_dir, "--test-limit", "20"))
    for name in ("recon.png", "recon.npy", "samples.png", "samples.npy", "interp.png", "model.pt",
                 "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics and json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved
    assert {"test_recon_l1", "test_mse", "test_psnr_db", "train_seconds", "steps", "device",
            "sample_code_mahalanobis_sq", "test_code_mahalanobis_sq"} <= set(saved)
    assert saved["steps"] == 2 and saved["test_images"] == 20
    samples, recon = np.load(out / "samples.npy"), np.load(out / "recon.npy")
    assert samples.shape == (8, 1, 28, 28) and samples.dtype == np.float32
    assert recon.shape == (20, 1, 28, 28) and 0 <= recon.min() and recon.max() <= 1

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = ae.main(["--sample-only", "--ckpt", str(out / "model.pt"), "--data-dir",
                     str(tiny_mnist_dir), "--test-limit", "20", "--num-samples", "8"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    beside = out / "sample_only"
    assert again["test_mse"] == pytest.approx(saved["test_mse"], rel=1e-5) and again["steps"] == 0
    assert np.array_equal(np.load(beside / "samples.npy"), samples)  # same noise, same model
    assert json.loads((beside / "metrics.json").read_text()) == again
    message = one_line_error(["--sample-only", "--ckpt", str(out / "model.pt"), "--out", str(out),
                              "--data-dir", str(tiny_mnist_dir)])
    assert "model.pt" in message


def test_stored_code_statistics_are_those_of_the_training_codes(tmp_path, tiny_mnist_dir):
    """Bug caught: the training codes' statistics never measured (buffers left at N(0, I)),
    or measured on other codes (a subset, the test set) than the training codes."""
    ae.main(["--epochs", "1", "--batch-size", "16", "--z-dim", "8", "--num-samples", "8",
             "--out", str(tmp_path / "run"), "--data-dir", str(tiny_mnist_dir)])
    model, _ = ae.load_checkpoint(tmp_path / "run" / "model.pt", lambda c: ae.AutoEncoder(**c))
    codes = ae.encode(model, ae.load_images("mnist", tiny_mnist_dir, "train")[0])   # (64, 8)
    assert torch.allclose(model.z_mean, codes.mean(0), atol=1e-5)
    assert torch.allclose(model.z_chol @ model.z_chol.T, torch.cov(codes.T), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape, dtype", [((30, 3, 12, 16), np.uint8), ((30, 8, 20), np.float32)])
def test_trains_on_a_users_images_of_another_size(tmp_path, shape, dtype):
    """Issue 26: C, H, W come from the data; samples and reconstructions have its shape."""
    images = np.random.default_rng(0).random(shape)
    path = tmp_path / "mine.npy"
    np.save(path, (images * 255).astype(np.uint8) if dtype == np.uint8 else images.astype(dtype))
    ae.main(smoke_args(tmp_path / "run", tmp_path, "--data", str(path), "--batch-size", "8"))
    C, H, W = shape[1:] if len(shape) == 4 else (1, *shape[1:])
    assert np.load(tmp_path / "run" / "samples.npy").shape == (8, C, H, W)
    assert np.load(tmp_path / "run" / "recon.npy").shape == (3, C, H, W)   # the last tenth


def test_help_shows_every_default(monkeypatch):
    """Issue 26: --epochs, --batch-size and --lr had no help string, so --help showed no default."""
    parsers, parse = [], argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a: parsers.append(self) or parse(self, *a))
    ae.parse_args([])
    assert parsers[0].formatter_class is argparse.ArgumentDefaultsHelpFormatter
    assert all(action.help for action in parsers[0]._actions)


@pytest.mark.parametrize("argv", [
    ["--lr", "-1"], ["--lr", "0"], ["--lr", "nan"], ["--batch-size", "0"], ["--epochs", "0"],
    ["--z-dim", "0"], ["--num-samples", "0"], ["--steps", "-1"], ["--seed", "-1"],
    ["--test-limit", "-5"], ["--sample-only"], ["--ckpt", "model.pt"], ["--codes", "sphere"],
    ["--loss", "l3"], ["--z-dim", "8", "--sample-only", "--ckpt", "m.pt"],
    ["--epochs", "3", "--sample-only", "--ckpt", "m.pt"]])
def test_bad_flags_get_usage_and_one_line(argv, capsys):
    """Bugs caught: a flag left unchecked (--lr -1 reached Adam: traceback); --z-dim given with
    --sample-only silently ignored (issue 26: the model is the checkpoint's)."""
    with pytest.raises(SystemExit) as e:
        ae.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and "error:" in err[-1] and argv[0] in err[-1]


def one_line_error(argv):
    with pytest.raises(SystemExit) as e:
        ae.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_bad_input_ends_in_one_line_and_overwrites_nothing(tmp_path, tiny_mnist_dir):
    """A file where --out belongs, missing data, images of a size the layers cannot halve
    twice, a checkpoint of another script, a truncated one, one of other images."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    one_line_error(smoke_args(notes, tiny_mnist_dir))
    assert notes.read_text() == "mine"
    assert "MNIST not found" in one_line_error(smoke_args(tmp_path / "a", tmp_path / "nowhere"))
    np.save(tmp_path / "odd.npy", np.zeros((20, 30, 30), np.uint8))
    assert "multiples of 4" in one_line_error(smoke_args(tmp_path / "b", tmp_path, "--data",
                                                         str(tmp_path / "odd.npy")))
    ae.main(smoke_args(tmp_path / "run", tiny_mnist_dir))
    good = (tmp_path / "run" / "model.pt").read_bytes()
    bad = tmp_path / "bad.pt"
    for content in (good[:len(good) // 2], b"garbage"):
        bad.write_bytes(content)
        assert "not a usable" in one_line_error(["--sample-only", "--ckpt", str(bad),
                                                 "--data-dir", str(tiny_mnist_dir)])
    torch.save({"script": "vae", "config": {}, "model": {}}, bad)
    assert "autoencoder.py" in one_line_error(["--sample-only", "--ckpt", str(bad),
                                               "--data-dir", str(tiny_mnist_dir)])
    np.save(tmp_path / "rgb.npy", np.zeros((20, 3, 28, 28), np.uint8))
    one_line_error(["--sample-only", "--ckpt", str(tmp_path / "run" / "model.pt"), "--data",
                    str(tmp_path / "rgb.npy"), "--out", str(tmp_path / "c")])
    assert (tmp_path / "run" / "model.pt").read_bytes() == good
