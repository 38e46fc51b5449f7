"""Tests of tools/speech_judge.py on synthetic recordings (no FSDD needed): file names, splitting
a file into its samples, the classifier's shapes, a tiny end-to-end run, bad input."""

import importlib.util
import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "speech_judge.py"
spec = importlib.util.spec_from_file_location("speech_judge", TOOL)
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)


def write_wav(path, pcm):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(S.SAMPLE_RATE)
        w.writeframes(np.asarray(pcm, "<i2").tobytes())


def tone(digit, seed, n=2000):
    """'Digit' d: a tone at 300 + 250 d Hz with a little vibrato, random loudness, a fade in and
    out, as int16 PCM through the mu-law channel (so never exactly 0, like a WaveNet sample)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / S.SAMPLE_RATE
    freq = (300 + 250 * digit) * (1 + 0.01 * np.sin(2 * np.pi * 5 * t + rng.uniform(0, 6)))
    audio = rng.uniform(0.2, 0.6) * np.minimum(1, np.minimum(t, t[-1] - t) / 0.02) \
        * np.sin(2 * np.pi * np.cumsum(freq) / S.SAMPLE_RATE)
    return np.round(S.mu_law_channel(audio).numpy() * 32767).astype(np.int16)


def test_the_digit_is_read_from_the_file_name():
    assert S.asked_digit("samples_digit3.wav") == 3
    assert S.asked_digit("digit7_take2.wav") == 7
    assert S.asked_digit("samples_digit12.wav") is None  # not a digit
    assert S.asked_digit("samples.wav") is None


def test_a_file_is_split_into_its_samples_at_the_silence_between_them():
    a, b, c = tone(1, 0), tone(2, 1, 1500), tone(3, 2)
    gap = np.zeros(2000, np.int16)  # wavenet.py: a quarter second of digital silence
    pieces = S.split_samples(np.concatenate([gap, a, gap, b, gap, c, gap]))
    assert [len(p) for p in pieces] == [len(a), len(b), len(c)] and np.array_equal(pieces[1], b)
    short = np.concatenate([a, np.zeros(100, np.int16), b])  # a short pause inside one sample
    assert len(S.split_samples(short)) == 1 and len(S.split_samples(np.zeros(3000, np.int16))) == 0


def test_mu_law_channel_is_within_a_step_and_idempotent():
    x = torch.linspace(-1, 1, 200001)
    y = S.mu_law_channel(x)
    assert torch.equal(S.mu_law_channel(y), y) and len(torch.unique(y)) == 256
    assert ((y - x).abs() <= 0.04 * x.abs() + 1e-4).all()  # 8-bit mu-law: a few % of |x|


def test_spectrogram_and_classifier_shapes():
    t = torch.arange(8000) / 8000.0
    spec = S.log_spectrogram(torch.stack([torch.sin(2 * math.pi * 1000 * t), torch.zeros(8000)]))
    assert spec.shape == (2, 129, 126)  # n_fft / 2 + 1 bins, 8000 / 64 + 1 frames
    assert (spec[0, :, 2:-2].argmax(0) == 32).all()  # 1000 Hz / 31.25 Hz per bin
    assert S.SpeechJudge()(spec).shape == (2, 10)
    assert np.array_equal(S.place_in_clip(np.ones(3, np.float32), 5, 1), [0, 1, 1, 1, 0])
    assert np.array_equal(S.place_in_clip(np.arange(8, dtype=np.float32), 5, 2), [2, 3, 4, 5, 6])


@pytest.fixture
def tones_dir(tmp_path):
    """A tiny FSDD look-alike: {digit}_{speaker}_{index}.wav, index 0-4 test, 5-7 train."""
    folder = tmp_path / "recordings"
    folder.mkdir()
    for d in range(10):
        for s, speaker in enumerate(("ann", "bob")):
            for i in range(8):
                write_wav(folder / f"{d}_{speaker}_{i}.wav", tone(d, 100 * d + 10 * s + i))
    return folder


def test_recordings_split_by_index_as_fsdd_does(tones_dir):
    """Index 0-4 of each speaker and digit is test, the rest train."""
    train, test, data_hash = S.load_fsdd(tones_dir)
    assert (len(train), len(test)) == (10 * 2 * 3, 10 * 2 * 5) and len(data_hash) == 16
    (tones_dir / "3_ann_5.wav").rename(tones_dir / "3_ann_4x.wav")  # not an FSDD name: skipped
    assert len(S.load_fsdd(tones_dir)[0]) == 59
    assert S.load_fsdd(tones_dir)[2] != data_hash  # other data, another cache key


def test_end_to_end_on_synthetic_tones(tmp_path, tones_dir, monkeypatch, capsys):
    """Trained on the tones, the judge names the test tones and hears the samples of each file
    as its digit; the same files under the next digit's name score low (cached judge reused);
    a cache that is not what its json names, or of another config, is trained again."""
    monkeypatch.setattr(S, "CLIP", 2000)  # quarter-second clips and small batches: fast
    monkeypatch.setattr(S, "BATCH", 16)
    run = tmp_path / "run"
    run.mkdir()
    gap = np.zeros(2000, np.int16)
    for d in range(10):
        two = np.concatenate([tone(d, 7000 + d), gap, tone(d, 8000 + d)])
        write_wav(run / f"samples_digit{d}.wav", two)
    argv = [str(run), "--data-dir", str(tones_dir), "--steps", "20", "--cache", str(tmp_path / "c")]
    report = S.main(argv)
    assert "training the speech judge" in capsys.readouterr().out
    assert report["judge_test_accuracy"] >= 0.9 and report["sample_n"] == 20
    assert report["sample_accuracy"] >= 0.9
    files = json.loads((run / "speech_judge.json").read_text())["files"]
    assert files["samples_digit4.wav"] == {"asked": 4, "heard": [4, 4]}
    for d in reversed(range(10)):  # the same clips, each file named after the next digit
        (run / f"samples_digit{d}.wav").rename(run / f"samples_digit{(d + 1) % 10}x.wav")
    wrong = S.main(argv)
    assert "training" not in capsys.readouterr().out and wrong["sample_accuracy"] <= 0.2
    assert wrong["judge_test_accuracy"] == report["judge_test_accuracy"]
    torch.save(S.SpeechJudge().state_dict(), tmp_path / "c" / "speech_judge_20steps.pt")
    assert S.main(argv) == wrong and "training" in capsys.readouterr().out  # not what json names
    monkeypatch.setattr(S, "BATCH", 8)  # another config under the same name: trained again
    S.main(argv)
    assert "training" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no wavs", "no data", "bad wav"])
def test_bad_input_ends_in_one_line(tmp_path, tones_dir, case):
    run = tmp_path / "run"
    run.mkdir()
    if case != "no wavs":
        write_wav(run / "samples_digit1.wav", tone(1, 0))
    if case == "bad wav":
        (run / "samples_digit2.wav").write_bytes(b"RIFF not really")
    data = tmp_path / "nothing" if case == "no data" else tones_dir
    with pytest.raises(SystemExit) as e:  # sys.exit(text): text on stderr, exit status 1
        S.main([str(run), "--data-dir", str(data), "--cache", str(tmp_path)])
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
