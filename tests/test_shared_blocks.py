"""The shared plumbing blocks, tested once through one carrier each.

tests/test_consistency.py keeps every copy byte-identical, so what holds for one copy
holds for all: run utilities, png writer and digit judge through autoencoder.py,
precision through pixelcnn.py.
"""

import argparse
import json
import struct
import zlib

import numpy as np
import pytest
import torch

import autoencoder as carrier
import pixelcnn


def test_atomic_write_never_touches_a_users_tmp_file_and_leaves_nothing_on_failure(tmp_path):
    """Bug caught: a fixed temporary name (OUT.tmp) that overwrites and deletes a user's file."""
    out = tmp_path / "foo"
    (tmp_path / "foo.tmp").write_bytes(b"mine")
    carrier.atomic_write(out, lambda f: f.write(b"new"))
    assert out.read_bytes() == b"new" and (tmp_path / "foo.tmp").read_bytes() == b"mine"

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        carrier.atomic_write(out, fail)
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foo", "foo.tmp"]


def test_prepare_out_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(carrier.RunError, match="is a file"):
        carrier.prepare_out_dir(tmp_path / "f")
    assert carrier.prepare_out_dir(tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("flag, value", [("lr", -1.0), ("lr", float("nan")), ("lr", 0.0),
                                         ("steps", -1), ("decay", 1.0)])
def test_check_flags_rejects_by_table(flag, value, capsys):
    """Bug caught: a flag left out of the table, or a comparison the wrong way round."""
    parser = argparse.ArgumentParser(prog="x")
    args = argparse.Namespace(lr=1e-3, steps=0, decay=0.5, unused=None)
    setattr(args, flag, value)
    with pytest.raises(SystemExit) as e:
        carrier.check_flags(parser, args, positive=("lr", "unused"), nonnegative=("steps",),
                            fraction=("decay",))
    assert e.value.code == 2
    assert f"--{flag}" in capsys.readouterr().err
    good = argparse.Namespace(lr=1e-3, steps=0, decay=0.0, unused=None)
    carrier.check_flags(parser, good, positive=("lr", "unused"), nonnegative=("steps",),
                        fraction=("decay",))


def test_reject_renamed_names_the_new_spelling(capsys):
    parser = argparse.ArgumentParser(prog="x")
    for argv in (["--K", "8"], ["--K=8"]):
        with pytest.raises(SystemExit) as e:
            carrier.reject_renamed(parser, argv, {"--K": "--codebook-size"})
        assert e.value.code == 2 and "--codebook-size" in capsys.readouterr().err
    carrier.reject_renamed(parser, ["--Kx", "--codebook-size", "8"], {"--K": "--codebook-size"})


def test_checkpoint_checks_config_types_and_weights(tmp_path):
    ckpt = {"script": carrier.SCRIPT, "model": {}, "config": {"z_dim": "32", "lr": 1}}
    with pytest.raises(carrier.RunError, match="z_dim"):
        carrier.checkpoint_config(ckpt, {"z_dim": int})
    assert carrier.checkpoint_config(ckpt, {"lr": float})["lr"] == 1
    with pytest.raises(carrier.RunError, match="z_dim"):
        carrier.checkpoint_config({"config": {"z_dim": True}}, {"z_dim": int})
    with pytest.raises(carrier.RunError, match="do not fit"):
        carrier.load_weights(torch.nn.Linear(2, 2), {"weight": torch.zeros(3, 3)})
    path = tmp_path / "m.pt"
    torch.save({"script": carrier.SCRIPT, "model": {}}, path)
    with pytest.raises(carrier.RunError, match="damaged"):
        carrier.load_checkpoint(path)


def read_png(data):
    """Minimal PNG reader for the writer's own output: (width, height, depth, colour, rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        ihdr = struct.unpack(">IIBBBBB", body) if kind == b"IHDR" else ihdr
        idat += body if kind == b"IDAT" else b""
        pos += 12 + n
    w, h, depth, colour = ihdr[:4]
    raw = zlib.decompress(idat)
    stride = (w * depth * (3 if colour == 2 else 1) + 7) // 8
    rows = [raw[y * (stride + 1):(y + 1) * (stride + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, depth, colour, np.frombuffer(b"".join(r[1:] for r in rows), np.uint8).reshape(h, stride)


def test_png_one_bit_round_trip():
    """Bug caught: bits packed LSB first, or rows not padded to whole bytes."""
    bits = (np.random.default_rng(0).random((13, 11)) < 0.3).astype(np.uint8)
    w, h, depth, colour, rows = read_png(carrier.png_bytes(bits, bit_depth=1))
    assert (w, h, depth, colour) == (11, 13, 1, 0)
    assert np.array_equal(np.unpackbits(rows, axis=1)[:, :11], bits)
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.array_equal(read_png(carrier.png_bytes(grey))[4], grey)
    with pytest.raises(ValueError):
        carrier.png_bytes(grey, bit_depth=1)


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    """FD(a, a + c) = |c|^2 exactly (same covariance); bug caught: a wrong sign or a missing
    square root in the cross term."""
    a = np.random.default_rng(0).normal(size=(400, 8)) @ np.diag(np.arange(1.0, 9.0))
    assert abs(carrier.frechet_distance(a, a)) < 1e-6
    fds = [carrier.frechet_distance(a, a + s) for s in (0.5, 1.0, 2.0)]
    assert np.allclose(fds, [8 * 0.25, 8 * 1.0, 8 * 4.0], rtol=1e-6)
    # b = 2a: mu_b = 2 mu_a, C_b = 4 C_a, so FD = |mu_a|^2 + tr C_a + 4 tr C_a - 2 tr(2 C_a)
    #                                          = |mu_a|^2 + tr C_a
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert np.isclose(carrier.frechet_distance(a, 2 * a), expected, rtol=1e-6)


def test_judge_score_spans_one_to_ten():
    assert np.isclose(carrier.judge_score(np.eye(10)[np.arange(100) % 10]), 10.0, rtol=1e-6)
    assert np.isclose(carrier.judge_score(np.eye(10)[np.zeros(100, int)]), 1.0)
    assert np.isclose(carrier.judge_score(np.full((50, 10), 0.1)), 1.0)


@pytest.fixture(scope="module")
def mnist_small():
    images, labels = carrier.load_mnist(carrier.HERE / "data" / "mnist", "train")
    x = torch.from_numpy(images[:3000].astype(np.float32) / 255).unsqueeze(1)
    y = torch.from_numpy(labels[:3000])
    return x[:2500], y[:2500], x[2500:], y[2500:]


def test_a_short_judge_run_learns_the_digits_and_a_damaged_cache_is_retrained(tmp_path, mnist_small):
    """A 150-step judge on 2,500 digits names most of 500 held-out ones; a damaged cached
    file fails its sha256 check and is trained again, never loaded."""
    x, y, xt, yt = mnist_small
    path = tmp_path / "judge.pt"
    judge, acc = carrier.load_or_train_judge(path, torch.device("cpu"), x, y, xt, yt, 150)
    assert acc > 0.85
    meta = json.loads(path.with_suffix(".json").read_text())
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    again, acc2 = carrier.load_or_train_judge(path, torch.device("cpu"), x, y, xt, yt, 150)
    assert acc2 == acc  # the same seed trains the same judge
    with pytest.raises(ValueError):  # images in [-1, 1] would train a judge of the wrong scale
        carrier.load_or_train_judge(path, torch.device("cpu"), 2 * x - 1, y, xt, yt, 150)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == meta["sha256"]
    for p1, p2 in zip(judge.parameters(), again.parameters()):
        assert torch.equal(p1, p2)


def test_judge_report_leaves_the_callers_random_stream_alone(tmp_path, mnist_small):
    x, y, xt, yt = mnist_small
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    report = carrier.judge_report(tmp_path / "run", torch.device("cpu"), x, y, xt, yt,
                                  samples=xt[:100], recons=xt[:100], judge_steps=20)
    assert torch.equal(torch.rand(3), expected)
    assert report["judge_n"] == 100 and report["recon_fd"] == report["anchor_real_fd"]
    assert report["anchor_noise_fd"] > report["anchor_real_fd"]


def test_pick_precision_takes_bf16_only_where_native():
    cpu = torch.device("cpu")
    assert pixelcnn.pick_precision("fp32", cpu) == "fp32"
    assert pixelcnn.pick_precision("bf16", cpu) == "bf16"
    assert pixelcnn.pick_precision("auto", cpu) == ("bf16" if pixelcnn.native_bf16(cpu) else "fp32")
