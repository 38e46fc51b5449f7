"""The shared plumbing blocks, tested once.

tests/test_consistency.py keeps every copy of a block byte-identical, so each block is
tested here as the text of its first carrier, run in a namespace of its own: what holds
for that copy holds for all.
"""

import argparse
import gzip
import json
import math
import os
import random
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, SCRIPTS, idx_bytes
from test_consistency import CARRIERS, shared_blocks


def block(name):
    """The names a shared block defines, run as the first carrier's copy."""
    script = CARRIERS[name][0]
    body, _, _ = shared_blocks((ROOT / f"{script}.py").read_text(), script)[name]
    ns = dict(argparse=argparse, gzip=gzip, json=json, math=math, os=os, random=random,
              struct=struct, sys=sys, time=time, zlib=zlib, Path=Path, np=np, torch=torch,
              SCRIPT="carrier")
    if name != "run utilities":
        ns.update(block("run utilities"))
    exec(compile(body, f"{script}.py:{name}", "exec"), ns)
    return ns


RUN = block("run utilities")
DATA = block("image data")
PNG = block("png writer")


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    """Bug caught: writing in place (a crash leaves half a file) or a leftover temp file."""
    out = tmp_path / "foo"
    (tmp_path / "foo.tmp").write_bytes(b"mine")
    RUN["atomic_write"](out, lambda f: f.write(b"new"))
    assert out.read_bytes() == b"new"

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        RUN["atomic_write"](out, fail)
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foo", "foo.tmp"]


@pytest.mark.parametrize("kind, bad, good", [
    ("positive_int", ["0", "-3", "x", "1.5"], [("1", 1), ("7", 7)]),
    ("nonnegative_int", ["-1", "x", str(2 ** 32)], [("0", 0), ("5", 5)]),
    ("positive_float", ["0", "-1e-3", "nan", "inf", "x"], [("2e-3", 2e-3)]),
    ("fraction", ["1", "-0.1", "nan", "x"], [("0", 0.0), ("0.999", 0.999)]),
])
def test_argparse_types_refuse_in_one_line(kind, bad, good, capsys):
    """Bug caught: a comparison the wrong way round, or nan slipping through a `<` test."""
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--v", type=RUN[kind])
    for text in bad:
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--v", text])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("x: error: argument --v")
    for text, value in good:
        assert parser.parse_args(["--v", text]).v == value


def test_checkpoints_load_strictly_and_refuse_in_one_line(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "model.pt"
    RUN["save_checkpoint"](path, {"n_in": 3, "n_out": 2}, model.state_dict())
    build = lambda c: torch.nn.Linear(c["n_in"], c["n_out"])  # noqa: E731
    loaded, config = RUN["load_checkpoint"](path, build)
    assert config == {"n_in": 3, "n_out": 2}
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    foreign = tmp_path / "foreign.pt"
    torch.save({"script": "other", "config": {}, "model": {}}, foreign)
    extra = tmp_path / "extra.pt"  # strict: a key the model lacks is refused too
    torch.save({"script": "carrier", "config": {"n_in": 3, "n_out": 2},
                "model": {**model.state_dict(), "extra": torch.zeros(1)}}, extra)
    for bad, b in [(tmp_path / "missing.pt", build), (truncated, build), (foreign, build),
                   (extra, build), (path, lambda c: torch.nn.Linear(4, 2)),
                   (path, lambda c: torch.nn.Linear(c["wrong key"], 2))]:
        with pytest.raises(RUN["RunError"]) as e:
            RUN["load_checkpoint"](bad, b)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)


class Counted:
    """A loss term that counts how often it is read (a device sync on a GPU)."""
    reads = 0

    def __init__(self, v):
        self.v = v

    def __float__(self):
        Counted.reads += 1
        return self.v


def test_progress_reads_terms_only_when_it_prints_and_stops_on_nan(capsys):
    """Bug caught: a float(loss) at every step (a host-device sync in the hot path), or a
    NaN that reaches the saved model."""
    progress = RUN["Progress"](100, label="train", every=3600)
    Counted.reads = 0
    for step in range(1, 100):
        progress(step, 8, loss=Counted(1.0))
    assert Counted.reads == 0 and capsys.readouterr().out == ""
    progress(100, 8, loss=Counted(0.5))
    line = capsys.readouterr().out
    assert Counted.reads == 1 and line.startswith("train 100/100 | loss 0.5 |")
    with pytest.raises(RUN["RunError"], match="non-finite loss"):
        RUN["Progress"](5, every=0)(1, 1, loss=torch.tensor(float("nan")))


def test_mnist_loads_as_images_in_unit_range_with_labels(mnist_dir):
    x, y = DATA["load_images"]("mnist", mnist_dir, "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1 and y.dtype == torch.int64
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_damaged_or_missing_idx_files_end_in_one_line(tmp_path, mnist_dir):
    RunError = DATA["RunError"]
    with pytest.raises(RunError, match="train-images-idx3-ubyte.gz"):
        DATA["load_images"]("mnist", tmp_path, "train")
    images = np.zeros((3, 28, 28), np.uint8)
    for name, raw in [("short.gz", gzip.compress(idx_bytes(images)[:-1])),
                      ("kind.gz", gzip.compress(b"\x00\x00\x09\x03" + idx_bytes(images)[4:])),
                      ("cut.gz", gzip.compress(idx_bytes(images))[:-5]),
                      ("plain.gz", idx_bytes(images)),
                      ("empty.gz", gzip.compress(b""))]:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(RunError):
            DATA["read_idx"](tmp_path / name)
    (tmp_path / "ok.gz").write_bytes(gzip.compress(idx_bytes(images)))
    assert DATA["read_idx"](tmp_path / "ok.gz").shape == (3, 28, 28)


def test_a_users_array_is_split_and_scaled(tmp_path):
    """(N, H, W) uint8 becomes (N, 1, H, W) in [0, 1]; the last tenth is the test split."""
    x = np.random.default_rng(0).integers(0, 256, (30, 12, 20)).astype(np.uint8)
    np.save(tmp_path / "a.npy", x)
    train, no_labels = DATA["load_images"](str(tmp_path / "a.npy"), None, "train")
    test, _ = DATA["load_images"](str(tmp_path / "a.npy"), None, "test")
    assert no_labels is None and train.shape == (27, 1, 12, 20) and test.shape == (3, 1, 12, 20)
    assert torch.equal(torch.cat([train, test])[:, 0], torch.from_numpy(x / np.float32(255)))
    rgb = np.random.default_rng(0).random((10, 3, 8, 8), dtype=np.float32)
    np.save(tmp_path / "rgb.npy", rgb)
    assert DATA["load_images"](str(tmp_path / "rgb.npy"), None, "train")[0].shape == (9, 3, 8, 8)


@pytest.mark.parametrize("array", [np.full((10, 8, 8), 1.5, np.float32),     # out of [0, 1]
                                   np.zeros((10, 8, 8, 3), np.uint8),         # channels last
                                   np.zeros((1, 8, 8), np.uint8),             # one image
                                   np.zeros((10, 8), np.uint8),               # no height
                                   np.zeros((10, 8, 8), np.int32)])           # not uint8
def test_a_bad_user_array_is_refused_in_one_line(tmp_path, array):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DATA["RunError"], match="--data"):
        DATA["load_images"](str(tmp_path / "bad.npy"), None, "train")
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(DATA["RunError"], match="not a readable"):
        DATA["load_images"](str(tmp_path / "text.npy"), None, "train")


def read_png(data):
    """Decode a PNG written by write_png (filter 0, 8 bits), checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind], pos = body, pos + 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    c = 3 if colour == 2 else 1
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * c)
    assert depth == 8 and (raw[:, 0] == 0).all() and b"IEND" in chunks
    return raw[:, 1:].reshape(h, w, c).squeeze(-1) if c == 1 else raw[:, 1:].reshape(h, w, c)


@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3)])
def test_png_round_trip(tmp_path, shape):
    """Bug caught: a CRC over the data without the chunk type, width and height swapped."""
    pixels = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    PNG["write_png"](tmp_path / "p.png", pixels)
    assert np.array_equal(read_png((tmp_path / "p.png").read_bytes()), pixels)


def test_image_grid_places_each_image_between_borders():
    images = np.stack([np.full((3, 4, 5), i / 4, np.float32) for i in range(5)])  # (5, 3, 4, 5)
    grid = PNG["image_grid"](images, ncol=3, border=2)
    assert grid.shape == (2 + 2 * 6, 2 + 3 * 7, 3)
    assert (grid[2:6, 2 + 7:7 + 7] == round(255 / 4)).all()        # image 1: row 0, column 1
    assert (grid[8:12, 2:7] == 191).all() and (grid[:2] == 128).all()  # image 3, a border
    assert PNG["image_grid"](images[:, :1], ncol=5).ndim == 2           # grey stays 2-D
