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


def test_samples_use_the_training_code_statistics():
    model = ae.AutoEncoder(z_dim=4, width=8)
    model.z_mean.fill_(3.0)
    model.z_std.fill_(0.0)
    # With zero spread every random code is the mean code, so all samples are equal
    # to the decode of that code.
    s = ae.sample(model, 6, torch.device("cpu"))
    expected = model.decode(torch.full((1, 4), 3.0)).detach()
    assert torch.allclose(s, expected.expand_as(s), atol=1e-6)


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


def test_cli_smoke_run_writes_every_output_and_reloads(tmp_path, mnist_dir, capsys):
    out = tmp_path / "run"
    metrics = ae.main(["--steps", "2", "--out", str(out), "--data-dir", str(mnist_dir),
                       "--test-limit", "200", "--num-samples", "8", "--width", "8"])
    for name in ("recon.png", "samples.png", "samples.npy", "interp.png", "model.pt",
                 "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert {"test_recon_l1", "test_mse", "test_psnr_db", "train_seconds", "steps",
            "device"} <= set(saved)
    assert saved["steps"] == 2 and saved["test_images"] == 200
    samples = np.load(out / "samples.npy")
    assert samples.shape == (8, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved

    again = ae.main(["--sample-only", "--ckpt", str(out / "model.pt"), "--out", str(out),
                     "--data-dir", str(mnist_dir), "--test-limit", "200", "--num-samples", "8"])
    assert again["test_mse"] == pytest.approx(saved["test_mse"], rel=1e-5)
    assert np.array_equal(np.load(out / "samples.npy"), samples)  # same noise, same model


def test_cli_errors_are_one_line(tmp_path, mnist_dir, capsys):
    with pytest.raises(SystemExit) as e:
        ae.main(["--sample-only"])
    assert e.value.code == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        ae.main(["--sample-only", "--ckpt", str(bad), "--out", str(tmp_path),
                 "--data-dir", str(mnist_dir)])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
