"""Tests of tools/digit_judge.py: the Fréchet distance and the score against exact values, the
fixed reference and the noise floor, a short judge run and its cache, bad input in one line."""

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "digit_judge.py"
spec = importlib.util.spec_from_file_location("digit_judge", TOOL)
D = importlib.util.module_from_spec(spec)
spec.loader.exec_module(D)


def gaussian_sample(mean, cov, n=200, seed=0):
    """n points whose sample mean and (unbiased) sample covariance are exactly mean and cov."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample cov exactly I
    return mean + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_is_exact_for_covariances_that_do_not_commute():
    """2 x 2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = C_a C_b (sqrt(M) = (M + sqrt(det M) I)
    / sqrt(tr M + 2 sqrt(det M))). Bug caught: sqrt(eig_a * eig_b) in place of the matrix
    square root (right only when C_a, C_b commute), a missing square root, a wrong sign."""
    ca, cb = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 4.0]])
    assert not np.allclose(ca @ cb, cb @ ca)
    mu_a, mu_b = np.array([0.5, -1.0]), np.array([2.0, 0.0])
    m = ca @ cb
    exact = ((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) \
        - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    a, b = gaussian_sample(mu_a, ca), gaussian_sample(mu_b, cb, seed=1)
    assert D.frechet_distance(a, b) == pytest.approx(exact, rel=1e-9)
    assert D.frechet_distance(b, a) == pytest.approx(exact, rel=1e-9)
    # 6 x 6, an independent route: tr (C_a C_b)^1/2 from the eigenvalues of the product itself.
    rng = np.random.default_rng(2)
    ca, cb = [(lambda g: g @ g.T + 0.1 * np.eye(6))(rng.normal(size=(6, 6))) for _ in range(2)]
    a, b = gaussian_sample(np.zeros(6), ca), gaussian_sample(np.ones(6), cb, seed=3)
    root_trace = np.sqrt(np.linalg.eigvals(ca @ cb).real).sum()
    exact = 6.0 + np.trace(ca) + np.trace(cb) - 2 * root_trace
    assert D.frechet_distance(a, b) == pytest.approx(exact, rel=1e-8)


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    """FD(a, a + c) = |c|^2 (same covariance); FD(a, 2a) = |mu_a|^2 + tr C_a."""
    a = np.random.default_rng(0).normal(size=(400, 8)) @ np.diag(np.arange(1.0, 9.0))
    assert abs(D.frechet_distance(a, a)) < 1e-6
    fds = [D.frechet_distance(a, a + s) for s in (0.5, 1.0, 2.0)]
    assert np.allclose(fds, [8 * 0.25, 8 * 1.0, 8 * 4.0], rtol=1e-6)
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert D.frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)


def test_score_is_exp_of_the_mean_kl():
    """Half the images confidently one digit (KL = log 10), half undecided (KL = 0): the score is
    exp(mean KL) = sqrt(10), not mean(exp KL) = 5.5. One class: 1; ten confident classes: 10."""
    confident, undecided = np.eye(10)[np.arange(50) % 10], np.full((50, 10), 0.1)
    mixed = np.concatenate([confident, undecided])
    assert D.judge_score(mixed) == pytest.approx(10 ** 0.5, rel=1e-6)
    assert D.judge_score(np.eye(10)[np.arange(100) % 10]) == pytest.approx(10.0, rel=1e-6)
    assert D.judge_score(np.eye(10)[np.zeros(100, int)]) == pytest.approx(1.0)
    assert D.judge_score(undecided) == pytest.approx(1.0)


class Spy:
    """A stand-in judge that records what it embeds: image i carries the number i / 1e5 in its
    first pixel (training digits 0..59,999, test digits 60,000..69,999)."""

    def __init__(self):
        self.ids, self.images = [], []

    def __call__(self, images):  # features: 5 pixels; probabilities: certain of digit id % 10
        self.ids.append(ids := np.rint(images[:, 0, 0] * 1e5).astype(int))
        if len(self.images) < 6:  # the reference, samples, recon, anchors
            self.images.append(images)
        return images.reshape(len(images), -1)[:, 1:6].astype(np.float64), np.eye(10)[ids % 10]


@pytest.fixture(scope="module")
def fake_mnist():
    rng = np.random.default_rng(0)
    train = rng.random((60000, 28, 28), dtype=np.float32)
    test = rng.random((10000, 28, 28), dtype=np.float32)
    train[:, 0, 0], test[:, 0, 0] = np.arange(60000) / 1e5, np.arange(60000, 70000) / 1e5
    return train, test


def test_the_reference_is_fixed_and_the_floor_uses_disjoint_training_sets(fake_mnist, monkeypatch):
    """Whatever the scored run (N, content, labels, recon), every FD is against test digits
    5,000..9,999; the anchors are the first N test digits (at most 5,000, so never the
    reference), the same binarised, and uniform noise; the floor at each N holds
    min(8, 60000 // N) disjoint sets of N training digits."""
    train, test = fake_mnist
    refs, real_fd = [], D.frechet_distance
    monkeypatch.setattr(D, "frechet_distance", lambda a, b: refs.append(b) or real_fd(a, b))
    for n, recon in ((50, test[:500]), (300, None), (7000, test[:500])):
        spy = Spy()
        samples = np.random.default_rng(n).random((n, 28, 28), dtype=np.float32)
        labels = np.rint(samples[:, 0, 0] * 1e5).astype(int) % 10  # what the spy hears ...
        labels[n // 2:] = (labels[n // 2:] + 1) % 10                # ... for the first half only
        out = D.figures(spy, train, test, samples, labels, recon)
        assert out["sample_label_match"] == 0.5
        assert np.array_equal(spy.ids[0], np.arange(65000, 70000))  # the reference, embedded first
        assert all(np.array_equal(r, refs[0]) for r in refs)          # ... and every FD's
        m = min(n, 5000)
        real, binarised, noise = spy.images[2 + (recon is not None):5 + (recon is not None)]
        assert np.array_equal(real, test[:m]) and out["anchor_real_n"] == m
        assert set(np.unique(binarised)) == {0, 1} and abs(binarised.mean() - real.mean()) < 0.01
        assert binarised[real > 0.9].mean() > 0.85 and binarised[real < 0.1].mean() < 0.15
        assert abs(noise.mean() - 0.5) < 0.01 and out["sample_n"] == n
        floors = spy.ids[5 + (recon is not None):]
        assert sorted(out["noise_floor_fd"], key=int) == [str(k) for k in sorted(
            {n, m} | ({500} if recon is not None else set()))]
        for k, fds in out["noise_floor_fd"].items():
            sets = [ids for ids in floors if len(ids) == int(k)]
            assert len(fds) == len(sets) == min(8, 60000 // int(k))
            ids = np.concatenate(sets)
            assert ids.max() < 60000 and len(np.unique(ids)) == len(ids)  # training, disjoint


@pytest.fixture(scope="module")
def mnist_small():
    x, y = D.load_mnist(ROOT / "data" / "mnist", "t10k")
    return (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300])


def test_a_short_run_learns_and_a_damaged_cache_is_retrained(tmp_path, mnist_small, monkeypatch,
                                                            capsys):
    """30 steps of 32 on 1,000 digits name 300 others well above chance (10 %); the cache is reused
    when intact, and trained again (the same weights, seed 0) when its file is not the one its
    json's sha256 names, or was made with another config."""
    monkeypatch.setattr(D, "BATCH", 32)
    train, test = mnist_small
    path, cpu = tmp_path / "judge.pt", torch.device("cpu")
    judge, acc = D.load_or_train(path, train, test, 30, cpu)
    assert acc > 0.4 and "training the digit judge" in capsys.readouterr().out
    again, acc2 = D.load_or_train(path, train, test, 30, cpu)
    assert acc2 == acc and "training" not in capsys.readouterr().out
    torch.save(D.DigitJudge().state_dict(), path)  # loadable, but not the weights the json names
    again, acc2 = D.load_or_train(path, train, test, 30, cpu)
    assert acc2 == acc and "training" in capsys.readouterr().out
    for p1, p2 in zip(judge.parameters(), again.parameters()):
        assert torch.equal(p1, p2)
    D.load_or_train(path, train, test, 5, cpu)  # another config: the cached judge is not used
    assert "training" in capsys.readouterr().out
    assert json.loads(path.with_suffix(".json").read_text())["config"]["steps"] == 5


@pytest.fixture
def small_mnist_dir(tmp_path):
    """MNIST files with 600 training digits and 300 test digits."""
    x, y = D.load_mnist(ROOT / "data" / "mnist", "t10k")
    folder = tmp_path / "mnist"
    folder.mkdir()
    for split, images, labels in (("train", x[300:900], y[300:900]), ("t10k", x[:300], y[:300])):
        n = len(images)
        raw = (images * 255).round().astype(np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            b"\0\0\x08\x03" + np.array([n, 28, 28], ">u4").tobytes() + raw.tobytes(), 1))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            b"\0\0\x08\x01" + np.array([n], ">u4").tobytes() + labels.astype(np.uint8).tobytes(),
            1))
    return folder


def test_command_line_writes_the_figures(tmp_path, small_mnist_dir, monkeypatch, capsys):
    """samples (uint8 (N, 1, 28, 28)), sample_labels.npy beside them found by itself, --recon:
    a table and digit_judge.json with every figure. (A reference of 100 test digits, for speed.)"""
    monkeypatch.setattr(D, "REFERENCE", slice(200, 300))
    x, y = D.load_mnist(small_mnist_dir, "t10k")
    run = tmp_path / "run"
    run.mkdir()
    np.save(run / "samples.npy", (x[:40, None] * 255).round().astype(np.uint8))
    np.save(run / "sample_labels.npy", y[:40])
    np.save(run / "recon.npy", x[:30])
    D.main([str(run / "samples.npy"), "--recon", str(run / "recon.npy"), "--steps", "3",
            "--data-dir", str(small_mnist_dir), "--cache", str(tmp_path / "cache"),
            "--device", "cpu"])
    out = json.loads((run / "digit_judge.json").read_text())
    assert out["sample_n"] == 40 and out["recon_n"] == 30 and out["anchor_real_n"] == 40
    assert out["sample_fd"] == pytest.approx(out["anchor_real_fd"], rel=1e-6)  # the same digits
    assert 0 <= out["sample_label_match"] <= 1 and sorted(out["noise_floor_fd"]) == ["30", "40"]
    assert len(out["noise_floor_fd"]["40"]) == 8 and len(out["noise_floor_fd"]["30"]) == 8
    assert out["anchor_noise_fd"] > 10 * out["anchor_real_fd"] and out["judge_steps"] == 3
    assert "noise (anchor)" in capsys.readouterr().out
    assert (tmp_path / "cache" / "digit_judge_3steps.pt").is_file()


@pytest.mark.parametrize("case", ["shape", "range", "nan", "missing", "labels", "mnist"])
def test_bad_input_ends_in_one_line(tmp_path, case):
    good = np.random.default_rng(0).random((10, 1, 28, 28), dtype=np.float32)
    bad = {"shape": good[:, :, :27], "range": good * 2, "nan": good * np.nan}.get(case, good)
    np.save(tmp_path / "samples.npy", bad)
    argv = [str(tmp_path / ("nothing.npy" if case == "missing" else "samples.npy")),  # --steps,
            "--data-dir", str(tmp_path if case == "mnist" else ROOT / "data" / "mnist"),  # --cache:
            "--steps", "1", "--cache", str(tmp_path)]  # fast and out of the repository if it runs
    if case == "labels":
        np.save(tmp_path / "sample_labels.npy", np.arange(9))  # 9 labels for 10 samples
    with pytest.raises(SystemExit) as e:
        D.main(argv)
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
    assert not (tmp_path / "digit_judge.json").exists()


def test_bad_input_from_the_shell_is_one_line_and_exit_1(tmp_path):
    np.save(tmp_path / "samples.npy", np.zeros((10, 3, 28, 28), np.float32))
    r = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "samples.npy")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
