"""autoencoder.py: the model, the shared blocks it carries (loader, PNG writer,
checkpoints), and the command line."""

import gzip
import json
import struct
import zlib

import numpy as np
import pytest
import torch

import autoencoder as ae
from conftest import idx_bytes


# ----------------------------------------------------------------------------- model

def test_shapes_through_encoder_and_decoder():
    model = ae.AutoEncoder(z_dim=16, width=8)
    x = torch.rand(5, 1, 28, 28)
    x_hat, z = model(x)
    assert z.shape == (5, 16)
    assert x_hat.shape == (5, 1, 28, 28)
    decoded = model.decode(torch.randn(3, 16) * 100)
    assert decoded.shape == (3, 1, 28, 28)
    assert decoded.min() >= 0 and decoded.max() <= 1


def test_every_parameter_gets_a_finite_gradient():
    model = ae.AutoEncoder(z_dim=8, width=8)
    x = torch.rand(4, 1, 28, 28)
    ae.reconstruction_loss(model(x)[0], x).backward()
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
    x, _ = ae.mnist_tensors(mnist_dir, "test")
    x = x[:32]
    model = ae.AutoEncoder(z_dim=16, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(100):
        value = ae.reconstruction_loss(model(x)[0], x, loss)
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
    model = ae.AutoEncoder(z_dim=3, width=1)  # narrow: 40,000 decodes stay cheap
    m, L = ae.code_gaussian(codes)
    model.z_mean.copy_(m)
    model.z_chol.copy_(L)
    z, images = ae.sample(model, 40000, torch.device("cpu"), seed=3)
    assert images.shape == (40000, 1, 28, 28)
    assert torch.allclose(z.mean(0), codes.mean(0), atol=0.03)
    assert torch.allclose(torch.cov(z.T), torch.cov(codes.T), atol=0.03)
    z_diag, _ = ae.sample(model, 40000, torch.device("cpu"), seed=3, diagonal=True)
    cov_diag = torch.cov(z_diag.T)
    assert torch.allclose(cov_diag.diagonal(), torch.cov(codes.T).diagonal(), atol=0.03)
    assert (cov_diag - torch.diag(cov_diag.diagonal())).abs().max() < 0.03


def test_mahalanobis_distance_is_the_quadratic_form():
    """Bug caught: S in place of S^-1 (|L^T (z - m)|^2), the wrong triangle solved, or the
    mean not subtracted. Exact: the quadratic form with an explicit inverse; d^2 of
    m + L eps is |eps|^2; the codes the Gaussian was fitted to average Z (N - 1) / N."""
    codes = correlated_codes(n=1000)
    m, L = ae.code_gaussian(codes)
    z = torch.randn(7, 3) * 3
    S_inv = torch.linalg.inv((L @ L.T).double())
    explicit = (((z - m).double() @ S_inv) * (z - m).double()).sum(1)
    assert torch.allclose(ae.mahalanobis_sq(z, m, L), explicit, rtol=1e-5)
    samples = ae.random_codes(m, L, 5000, seed=4)
    eps = torch.randn(5000, 3, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(ae.mahalanobis_sq(samples, m, L), eps.double().pow(2).sum(1),
                          rtol=1e-4, atol=1e-4)
    assert ae.mahalanobis_sq(codes, m, L).mean().item() == pytest.approx(3 * 999 / 1000, rel=1e-4)


def test_interpolation_starts_and_ends_at_the_endpoints():
    model = ae.AutoEncoder(z_dim=4, width=8)
    x_a, x_b = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    path = ae.interpolate(model, x_a, x_b, torch.device("cpu"), steps=5).view(2, 5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(path[:, 0], model.decode(model.encoder(x_a)), atol=1e-6)
        assert torch.allclose(path[:, -1], model.decode(model.encoder(x_b)), atol=1e-6)


# ----------------------------------------------------------------------------- png writer

def decode_png(data):
    """A minimal reader for what png_bytes writes: checks every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    channels = {0: 1, 2: 3}[colour]
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + w * channels)
    assert depth == 8 and (rows[:, 0] == 0).all()  # filter type 0 on every row
    return rows[:, 1:].reshape(h, w, channels).squeeze(-1) if channels == 1 else \
        rows[:, 1:].reshape(h, w, 3)


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 3), (1, 1)])
def test_png_round_trip(tmp_path, shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    ae.write_png(tmp_path / "x.png", pixels)
    data = (tmp_path / "x.png").read_bytes()
    w, h = struct.unpack(">II", data[16:24])
    assert (h, w) == shape[:2]
    assert np.array_equal(decode_png(data), pixels)


def test_image_grid_layout():
    images = np.zeros((5, 1, 3, 4), np.float32)
    images[4] = 1.0
    grid = ae.image_grid(images, ncol=2, border=2)
    assert grid.shape == (2 + 3 * (3 + 2), 2 + 2 * (4 + 2))
    assert grid[0, 0] == 128                       # border
    assert (grid[2:5, 2:6] == 0).all()             # first tile
    assert (grid[12:15, 2:6] == 255).all()         # fifth tile: third row, first column
    assert (grid[12:15, 8:12] == 128).all()        # the empty slot stays border-coloured


# ----------------------------------------------------------------------------- mnist loader

def test_loader_reads_the_shipped_files(mnist_dir):
    images, labels = ae.load_mnist(mnist_dir, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert labels[:3].tolist() == [7, 2, 1]  # the well-known first test digits


def write_fake_mnist(folder, image_magic=None):
    folder.mkdir(exist_ok=True)
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8), magic=image_magic)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(np.arange(4, dtype=np.uint8))))


def test_loader_rejects_a_wrong_magic_number(tmp_path):
    write_fake_mnist(tmp_path, image_magic=0x0801)
    with pytest.raises(ae.RunError, match="magic number"):
        ae.load_mnist(tmp_path, "train")


def test_loader_rejects_a_truncated_file_and_a_corrupt_archive(tmp_path):
    write_fake_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ae.RunError, match="damaged"):
        ae.load_mnist(tmp_path, "test")
    path.write_bytes(gzip.compress(raw)[:-20])  # cut the gzip stream itself
    with pytest.raises(ae.RunError, match="corrupt gzip"):
        ae.load_mnist(tmp_path, "test")


def test_missing_files_without_network_give_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(ae.urllib.request, "urlopen", offline)
    with pytest.raises(ae.RunError) as err:
        ae.load_mnist(tmp_path / "nowhere", "train")
    message = str(err.value)
    assert "\n" not in message and "train-images-idx3-ubyte.gz" in message
    assert not (tmp_path / "nowhere" / "train-images-idx3-ubyte.gz").exists()


def test_download_checks_the_sha256(tmp_path, monkeypatch):
    """A mirror that serves the wrong content is refused, and nothing is written."""
    class Response:
        def __init__(self, data):
            self.data = data

        def read(self):
            return self.data

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(ae.urllib.request, "urlopen",
                        lambda url, timeout: Response(gzip.compress(b"not mnist")))
    with pytest.raises(ae.RunError, match="no mirror"):
        ae.download_mnist_file("t10k-labels-idx1-ubyte", tmp_path / "t10k-labels-idx1-ubyte.gz")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- checkpoints, CLI

def test_checkpoint_from_another_script_or_corrupt_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"script": "vae", "model": {}, "config": {}}, path)
    with pytest.raises(ae.RunError, match="vae"):
        ae.load_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ae.RunError, match="not a readable checkpoint"):
        ae.load_checkpoint(path)


def test_non_finite_loss_stops_with_a_message():
    with pytest.raises(ae.RunError, match="non-finite loss at step 7"):
        ae.check_finite(7, loss=torch.tensor(float("nan")))
    ae.check_finite(7, loss=torch.tensor(1.0))


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")

    def fails(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ae.atomic_write(path, fails)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def png_shape(path):
    return decode_png(path.read_bytes()).shape


def smoke_args(out, data_dir, *extra):
    return ["--steps", "2", "--batch-size", "16", "--width", "8", "--z-dim", "8",
            "--num-samples", "8", "--out", str(out), "--data-dir", str(data_dir), *extra]


def test_cli_smoke_run_writes_every_output_and_reloads(tmp_path, tiny_mnist_dir, capsys):
    """Bugs caught: hard-coded test indices (100:108, 200:208, a 4 x 16 recon grid) that fail
    or draw empty grids on a test file of fewer than 208 images (this one holds 32); an
    evaluation with --sample-only that overwrites the training run's metrics.json."""
    out = tmp_path / "run"
    metrics = ae.main(smoke_args(out, tiny_mnist_dir, "--test-limit", "20"))
    for name in ("recon.png", "samples.png", "samples.npy", "interp.png", "model.pt",
                 "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert {"test_recon_l1", "test_mse", "test_psnr_db", "train_seconds", "steps", "device",
            "sample_code_mahalanobis_sq", "test_code_mahalanobis_sq", "judge_n", "sample_fd",
            "sample_score", "recon_fd", "anchor_real_fd", "anchor_noise_fd"} <= set(saved)
    assert saved["steps"] == 2 and saved["test_images"] == 20 and saved["judge_n"] == 8
    samples = np.load(out / "samples.npy")
    assert samples.shape == (8, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved
    # 32 test digits: two rows of 16 and their reconstructions; 8 interpolation pairs.
    assert png_shape(out / "recon.png") == (2 + 4 * 30, 2 + 16 * 30)
    assert png_shape(out / "interp.png") == (2 + 8 * 30, 2 + 10 * 30)

    before = (out / "metrics.json").read_bytes()
    again = ae.main(["--sample-only", "--ckpt", str(out / "model.pt"), "--out", str(out),
                     "--data-dir", str(tiny_mnist_dir), "--test-limit", "20", "--num-samples",
                     "8", "--steps", "2"])
    assert again["test_mse"] == pytest.approx(saved["test_mse"], rel=1e-5)
    assert again["sample_fd"] == pytest.approx(saved["sample_fd"], rel=1e-4)
    assert np.array_equal(np.load(out / "samples.npy"), samples)  # same noise, same model
    assert (out / "metrics.json").read_bytes() == before
    assert json.loads((out / "eval_metrics.json").read_text()) == again


def test_stored_code_statistics_are_those_of_the_training_codes(tmp_path, tiny_mnist_dir):
    """Bug caught: the training codes' statistics never measured (buffers left at N(0, I)),
    or measured on other codes (a subset, the test set) than the training codes."""
    ae.main(smoke_args(tmp_path / "run", tiny_mnist_dir))
    model = ae.load_model(tmp_path / "run" / "model.pt", torch.device("cpu"))
    x_train, _ = ae.mnist_tensors(tiny_mnist_dir, "train")
    codes = ae.encode_all(model, x_train, torch.device("cpu"))  # (64, 8)
    assert torch.allclose(model.z_mean, codes.mean(0), atol=1e-5)
    assert torch.allclose(model.z_chol @ model.z_chol.T, torch.cov(codes.T), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("argv", [
    ["--lr", "-1"], ["--lr", "0"], ["--lr", "nan"], ["--batch-size", "0"], ["--epochs", "0"],
    ["--z-dim", "0"], ["--width", "-3"], ["--num-samples", "1"], ["--steps", "-1"],
    ["--test-limit", "-5"], ["--sample-only"], ["--ckpt", "model.pt"], ["--codes", "sphere"],
    ["--loss", "l3"]])
def test_bad_flags_get_usage_and_one_line(argv, capsys):
    """Bug caught: a flag left out of the validation table (--lr -1 reached Adam: traceback)."""
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


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path, tiny_mnist_dir):
    """Bug caught: --batch-size above the training set's size silently training 0 steps."""
    out = tmp_path / "run"
    message = one_line_error(smoke_args(out, tiny_mnist_dir, "--batch-size", "65"))
    assert "--batch-size 65" in message and "64" in message
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()


def test_out_naming_a_file_is_refused(tmp_path, tiny_mnist_dir):
    """Bug caught: --out naming an existing file (FileExistsError traceback)."""
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert "is a file" in one_line_error(smoke_args(path, tiny_mnist_dir))
    assert path.read_text() == "mine"


@pytest.mark.parametrize("damage, expected", [
    ("no config keys", "'z_dim'"), ("z_dim a string", "'z_dim'"), ("width a bool", "'width'"),
    ("config not the weights", "does not match"), ("a buffer missing", "do not fit"),
    ("a negative z_dim", "does not match"), ("NaN weights", "NaN")])
def test_a_damaged_checkpoint_of_this_script_gets_one_line(tmp_path, tiny_mnist_dir, damage,
                                                           expected):
    """Bug caught: a checkpoint with the right script tag but a broken config or weights
    reaching AutoEncoder(cfg["z_dim"], ...) or load_state_dict (KeyError, size mismatch)."""
    state, config = ae.AutoEncoder(z_dim=4, width=8).state_dict(), {"z_dim": 4, "width": 8}
    if damage == "no config keys":
        config = {}
    elif damage == "z_dim a string":
        config["z_dim"] = "4"
    elif damage == "width a bool":
        config["width"] = True
    elif damage == "config not the weights":
        config["z_dim"] = 16
    elif damage == "a buffer missing":
        del state["z_chol"]
    elif damage == "a negative z_dim":
        config["z_dim"] = -4
    else:
        state["decoder.0.bias"][0] = float("nan")
    ae.save_checkpoint(tmp_path / "model.pt", state, config)
    message = one_line_error(["--sample-only", "--ckpt", str(tmp_path / "model.pt"), "--out",
                              str(tmp_path / "eval"), "--data-dir", str(tiny_mnist_dir)])
    assert expected in message


def test_cli_errors_are_one_line(tmp_path, tiny_mnist_dir):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    one_line_error(["--sample-only", "--ckpt", str(bad), "--out", str(tmp_path),
                    "--data-dir", str(tiny_mnist_dir)])
