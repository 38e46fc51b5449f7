"""Fixtures shared by the tests of every script.

The scripts live at the repository root and import nothing from each other; the
tests import them as modules (nothing runs at import time) and call their parts.
"""

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCRIPTS = ["autoencoder", "vae", "pixelcnn", "wavenet", "vqvae", "vqgan", "lfq", "arith_coding"]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a statistical test that
    passes once passes every time."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def mnist_dir():
    """The real MNIST files shipped in data/mnist."""
    return ROOT / "data" / "mnist"


def idx_bytes(array, magic=None):
    """Encode a uint8 array as an idx file (magic 0x0803 for 3-D, 0x0801 for 1-D)."""
    array = np.asarray(array, np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture
def tiny_mnist_dir(tmp_path):
    """A 64-train / 32-test MNIST look-alike made from the real files' first images:
    real digits, tiny size, for smoke runs that must be fast."""
    real = ROOT / "data" / "mnist"
    out = tmp_path / "mnist"
    out.mkdir()
    for prefix, n in (("train", 64), ("t10k", 32)):
        for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
            raw = gzip.decompress((real / f"{prefix}-{kind}-ubyte.gz").read_bytes())
            header = 4 + 4 * ndim
            shape = struct.unpack(f">{ndim}I", raw[4:header])
            data = np.frombuffer(raw, np.uint8, offset=header).reshape(shape)[:n]
            (out / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(data)))
    return out
