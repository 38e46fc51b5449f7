"""Tests of tools/audio_baselines.py: the Markov bits/sample against a hand computation."""

import importlib.util
import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location(
    "audio_baselines", Path(__file__).resolve().parent.parent / "tools" / "audio_baselines.py")
B = importlib.util.module_from_spec(spec)
spec.loader.exec_module(B)


def test_markov_bits_equal_a_hand_computation():
    """Catches the order-1 table read the wrong way round (P(previous | next)), a missing
    add-one term, or order 0 in place of order 1 for the first sample: training data that
    cycles 0 -> 1 -> 2 -> 0 makes every bigram count known by hand."""
    train = [np.array([0, 1, 2] * 10)]           # 30 samples, 29 pairs: 0->1 x10, 1->2 x10, 2->0 x9
    test = [np.array([0, 1, 2, 0]), np.array([2, 1])]
    bits0, bits1 = B.markov_bits(train, test)
    p0 = lambda s: ((10 if s in (0, 1, 2) else 0) + 1) / (30 + 256)
    row = {0: 10, 1: 10, 2: 9}                      # pairs starting with each class
    seen = {(0, 1): 10, (1, 2): 10, (2, 0): 9}
    p1 = lambda a, b: (seen.get((a, b), 0) + 1) / (row[a] + 256)
    want0 = -sum(math.log2(p0(s)) for s in [0, 1, 2, 0, 2, 1]) / 6
    want1 = -(math.log2(p0(0)) + math.log2(p1(0, 1)) + math.log2(p1(1, 2)) + math.log2(p1(2, 0))
              + math.log2(p0(2)) + math.log2(p1(2, 1))) / 6
    assert bits0 == pytest.approx(want0, rel=1e-12) and bits1 == pytest.approx(want1, rel=1e-12)


def test_mu_law_classes_match_the_formula():
    x = np.array([-1.0, -0.5, 0.0, 1e-3, 0.5, 1.0])
    y = np.sign(x) * np.log1p(255 * np.abs(x)) / math.log1p(255)
    assert B.mu_law_encode(x).tolist() == np.floor((y + 1) / 2 * 255 + 0.5).astype(int).tolist()
    assert B.mu_law_encode(x)[[0, 2, -1]].tolist() == [0, 128, 255]


def write_wav(path, pcm, rate=8000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, "<i2").tobytes())


def test_command_line_on_a_wav_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("0_ann_0.wav", "0_ann_7.wav", "3_bob_12.wav", "3_bob_4.wav"):
        write_wav(tmp_path / name, rng.integers(-3000, 3000, 500))
    result = B.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "b.json")])
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "b.json").read_text()) == result
    assert (result["train_recordings"], result["test_recordings"], result["test_samples"]) == (2, 2, 1000)
    write_wav(tmp_path / "0_ann_1.wav", np.zeros(10), rate=16000)
    with pytest.raises(SystemExit) as e:
        B.main(["--data-dir", str(tmp_path)])
    assert "expected mono 16-bit 8000 Hz" in str(e.value.code)
