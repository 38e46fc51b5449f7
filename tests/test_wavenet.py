"""Tests of wavenet.py: mu-law, causality, receptive field, fast generation, the CLI.

Everything runs on synthetic data (tones, random networks); no FSDD files needed."""

import io
import json
import math
import tarfile
import urllib.error
import wave

import numpy as np
import pytest
import torch

import wavenet as W


def small(cond=True, speakers=3):
    """A small net whose stacks wrap around (dilations 1..8, twice): RF = 2 + 2 * 15 = 32."""
    return W.WaveNet(channels=8, skip_channels=12, stacks=2, max_dilation=8,
                     n_digits=10 if cond else 0, n_speakers=speakers if cond else 0, cond_channels=4)


# ----------------------------------------------------------------------------- mu-law

def test_mu_law_round_trip_is_within_one_step():
    levels = W.mu_law_decode(torch.arange(256))  # the 256 reconstruction levels, increasing
    assert torch.all(levels[1:] > levels[:-1])
    x = torch.linspace(-1, 1, 200_001)
    q = W.mu_law_encode(x)
    assert q.min() == 0 and q.max() == 255
    gap_up = levels[(q + 1).clamp(max=255)] - levels[q]
    gap_down = levels[q] - levels[(q - 1).clamp(min=0)]
    err = (W.mu_law_decode(q) - x).abs()
    assert torch.all(err <= torch.maximum(gap_up, gap_down) + 1e-7)
    # Classes survive decode -> encode exactly.
    assert torch.equal(W.mu_law_encode(levels), torch.arange(256))


def test_mu_law_end_points_and_zero():
    assert W.mu_law_encode(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    assert W.mu_law_decode(torch.tensor(0)).item() == pytest.approx(-1.0, abs=1e-6)
    assert W.mu_law_decode(torch.tensor(255)).item() == pytest.approx(1.0, abs=1e-6)
    # An even number of levels has none at exactly 0: 0 goes to class 128, the smallest
    # positive level (8.6e-5, under 3 LSB of 16-bit audio); class 127 is its mirror image.
    assert 0 < W.mu_law_decode(torch.tensor(128)).item() < 1e-4
    assert W.mu_law_decode(torch.tensor(127)).item() == pytest.approx(
        -W.mu_law_decode(torch.tensor(128)).item(), rel=1e-4)


# ----------------------------------------------------------------------------- causality

def input_gradient(model, t, T, h=None):
    """Which input times the logits at time t depend on: |d logits_t / d e| summed over
    channels, (T,) float64."""
    e = torch.randn(1, model.embed.embedding_dim, T, dtype=torch.float64, requires_grad=True)
    model.forward_embedded(e, h)[0, :, t].sum().backward()
    return e.grad[0].abs().sum(0)


@pytest.mark.parametrize("t", [0, 5, 40, 79])
def test_causal_and_receptive_field_exact(t):
    model = small().double()
    h = model.condition(torch.tensor([3]), torch.tensor([1]))
    grad = input_gradient(model, t, 80, h)
    r, ms = W.receptive_field(model)
    assert (r, ms) == (32, 4.0)
    # Causality: exactly zero for inputs at times >= t (logit t predicts x_t from x_<t).
    assert torch.all(grad[t:] == 0)
    # Receptive field: non-zero exactly on t - R .. t - 1.
    nonzero = set(torch.nonzero(grad).flatten().tolist())
    assert nonzero == set(range(max(t - r, 0), t))


def test_default_receptive_field_is_what_the_function_reports():
    model = W.build_model(vars(W.parse_args([])), n_speakers=6).double()
    r, ms = W.receptive_field(model)
    assert (r, ms) == (1024, 128.0)
    t = 1100
    grad = input_gradient(model, t, t + 3)
    assert set(torch.nonzero(grad).flatten().tolist()) == set(range(t - r, t))


# ----------------------------------------------------------------------------- fast generation

@pytest.mark.parametrize("cond", [True, False])
def test_fast_generation_logits_equal_full_forward(cond):
    model = small(cond).eval()
    x = torch.randint(0, 256, (3, 100))  # 100 > RF 32: every queue wraps several times
    digit, speaker = (torch.tensor([0, 4, 9]), torch.tensor([0, 1, 2])) if cond else (None, None)
    with torch.no_grad():
        full = model(x, digit, speaker)
    fast = W.fast_logits(model, x, digit, speaker)
    assert fast.shape == full.shape == (3, 256, 100)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)


def test_fast_generation_at_the_default_size():
    model = W.build_model(vars(W.parse_args([])), n_speakers=6).eval()
    x = torch.randint(0, 256, (2, 1100))
    digit, speaker = torch.tensor([2, 7]), torch.tensor([5, 0])
    with torch.no_grad():
        full = model(x, digit, speaker)
    torch.testing.assert_close(W.fast_logits(model, x, digit, speaker), full, rtol=1e-4, atol=1e-4)


def test_generate_returns_valid_classes_and_depends_on_seed():
    model = small().eval()
    digit, speaker = torch.tensor([1, 2]), torch.tensor([0, 0])
    a = W.generate(model, digit, speaker, 50, seed=1, show_progress=False)
    b = W.generate(model, digit, speaker, 50, seed=1, show_progress=False)
    c = W.generate(model, digit, speaker, 50, seed=2, show_progress=False)
    assert a.shape == (2, 50) and a.min() >= 0 and a.max() < 256
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- conditioning and training

def test_conditioning_changes_the_output():
    model = small().eval()
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        base = model(x, torch.tensor([1]), torch.tensor([0]))
        other_digit = model(x, torch.tensor([2]), torch.tensor([0]))
        other_speaker = model(x, torch.tensor([1]), torch.tensor([2]))
    assert (base - other_digit).abs().max() > 1e-3
    assert (base - other_speaker).abs().max() > 1e-3


def test_loss_falls_on_a_fixed_batch_of_tones():
    train, _ = W.make_tones()
    speakers = sorted({s for _, _, s in train})
    x, digit, speaker, mask = W.random_crops(train, 4, 400, np.random.default_rng(0), speakers)
    model = small(speakers=len(speakers))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = W.nll_loss(model(x, digit, speaker), x, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(256)  # starts near uniform over 256 classes
    assert losses[-1] < 0.7 * losses[0]


# ----------------------------------------------------------------------------- CLI

# ----------------------------------------------------------------------------- judge

def test_log_spectrogram_puts_a_sine_in_its_frequency_bin():
    t = torch.arange(8000) / 8000.0
    for freq in (250.0, 1000.0, 3000.0):  # bins are 8000 / 256 = 31.25 Hz wide
        spec = W.log_spectrogram(torch.sin(2 * math.pi * freq * t)[None])[0]  # (129, frames)
        assert spec.shape[0] == 129
        assert torch.all(spec[:, 2:-2].argmax(0) == round(freq / 31.25))


def test_judge_tells_tones_apart_and_scores_the_requested_digit(tmp_path):
    """Trained on the synthetic tones (digit = pitch), the judge must name the test
    tones; and judge_samples must count a sample as right only when the judge hears
    the digit that was *requested*: real test clips given their own digits score
    high, the same clips given the next digit score low."""
    train, test = W.make_tones()
    judge = W.train_judge(train, 300, torch.device("cpu"), seed=0)
    decode = lambda c: W.mu_law_decode(torch.from_numpy(c.astype(np.int64))).numpy()
    truth = torch.tensor([d for _, d, _ in test])
    assert (W.judge_digits(judge, [decode(c) for c, _, _ in test], torch.device("cpu"))
            == truth).double().mean() >= 0.9
    pcm = W.to_pcm(torch.from_numpy(np.stack([c for c, _, _ in test]).astype(np.int64)))

    class Args:
        judge_steps, seed, speaker = 300, 0, "dark"
    right = W.judge_samples(train, test, pcm, truth, Args, torch.device("cpu"), tmp_path)
    wrong = W.judge_samples(train, test, pcm, (truth + 1) % 10, Args, torch.device("cpu"), tmp_path)
    assert right["judge_test_accuracy"] >= 0.9 and right["judge_sample_accuracy"] >= 0.9
    assert wrong["judge_sample_accuracy"] <= 0.2
    assert right["judge_sample_digits"] == wrong["judge_sample_digits"]  # same clips, same verdicts
    # spectrograms.png: one row per digit, a real clip then that digit's 4 "samples".
    with open(tmp_path / "spectrograms.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- command line

TINY = ["--data", "tones", "--steps", "3", "--channels", "8", "--skip-channels", "8",
        "--max-dilation", "16", "--test-limit", "6", "--gen-seconds", "0.05",
        "--naive-steps", "2", "--crop", "300", "--speaker", "dark", "--judge-steps", "2"]


def test_cli_smoke_run_writes_every_output_and_sample_only_reloads(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = W.main(TINY + ["--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads((out / "metrics.json").read_text()) == metrics
    for key in ("test_nll_bits_per_sample", "gen_samples_per_second_fast",
                "gen_samples_per_second_naive", "receptive_field_ms", "train_seconds",
                "judge_test_accuracy", "judge_sample_accuracy"):
        assert math.isfinite(metrics[key])
    assert len(metrics["judge_sample_digits"]) == 10 and (out / "spectrograms.png").is_file()
    pcm = np.load(out / "samples.npy")
    assert pcm.dtype == np.int16 and pcm.shape == (10, 400)
    for d in range(10):
        with wave.open(str(out / f"samples_digit{d}.wav")) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == \
                (1, 2, 8000, 400)
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["script"] == "wavenet" and ckpt["config"]["speakers"] == ["bright", "dark"]
    # --sample-only reloads the weights: same test NLL, same samples (same seed).
    again = W.main(["--data", "tones", "--sample-only", "--ckpt", str(out / "model.pt"),
                    "--out", str(tmp_path / "again"), "--test-limit", "6",
                    "--gen-seconds", "0.05", "--naive-steps", "2", "--speaker", "dark",
                    "--judge-steps", "0"])
    assert again["test_nll_bits_per_sample"] == metrics["test_nll_bits_per_sample"]
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npy"), pcm)


class Stop(Exception):
    pass


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """Stop after step 3, resume from the state saved at step 2 in a 'new process' (a
    fresh, differently seeded model): the weights must come out bit-identical -- Adam's
    moments, the schedule's position and the crop sampler's random state restored."""
    train, _ = W.make_tones()
    speakers = sorted({s for _, _, s in train})
    args = W.parse_args(TINY[:2] + ["--steps", "6", "--save-every", "2", "--warmup", "2",
                                    "--precision", "fp32", "--channels", "8",
                                    "--skip-channels", "8", "--max-dilation", "16",
                                    "--crop", "300"])
    cpu = torch.device("cpu")

    def fresh(seed):
        torch.manual_seed(seed)
        return W.build_model(vars(args), len(speakers))

    straight = fresh(0)
    assert W.train(straight, train, speakers, args, cpu, out=tmp_path / "a") == (6, 0)
    assert (tmp_path / "a" / "model.pt").is_file()           # saved along the way
    assert not (tmp_path / "a" / "train_state.pt").exists()  # finished: nothing to resume

    real_update = W.Progress.update

    def stop_after_three(self, count, *rest, **kw):
        real_update(self, count, *rest, **kw)
        if count == 3:
            raise Stop

    monkeypatch.setattr(W.Progress, "update", stop_after_three)
    with pytest.raises(Stop):
        W.train(fresh(0), train, speakers, args, cpu, out=tmp_path / "b")
    monkeypatch.setattr(W.Progress, "update", real_update)
    assert W.load_checkpoint(tmp_path / "b" / "train_state.pt")["step"] == 2

    resumed = fresh(1)
    assert W.train(resumed, train, speakers, args, cpu, out=tmp_path / "b", resume=True) == (6, 2)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)

    other = W.parse_args(TINY[:2] + ["--steps", "6", "--save-every", "2", "--warmup", "2",
                                     "--precision", "fp32", "--channels", "8",
                                     "--skip-channels", "8", "--max-dilation", "16",
                                     "--crop", "400"])
    monkeypatch.setattr(W.Progress, "update", stop_after_three)
    with pytest.raises(Stop):
        W.train(fresh(0), train, speakers, args, cpu, out=tmp_path / "c")
    with pytest.raises(W.RunError, match="--crop"):
        W.train(fresh(0), train, speakers, other, cpu, out=tmp_path / "c", resume=True)
    with pytest.raises(W.RunError, match="not found"):
        W.train(fresh(0), train, speakers, args, cpu, out=tmp_path / "a", resume=True)


def test_missing_data_offline_is_one_clear_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(W.urllib.request, "urlopen", offline)
    data_dir = tmp_path / "fsdd" / "recordings"
    with pytest.raises(SystemExit) as e:
        W.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "out")])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    assert str(data_dir) in msg and "3,000" in msg
    assert not data_dir.exists() and not list(tmp_path.glob("fsdd/*.tmp"))


def fake_archive(n_recordings):
    """A tar.gz shaped like the FSDD release, plus members that must be ignored."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, data=b"RIFF"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("free-spoken-digit-dataset-1.0.10/README.md")
        add("free-spoken-digit-dataset-1.0.10/recordings/../../evil_0_0.wav")
        add("free-spoken-digit-dataset-1.0.10/other/0_x_0.wav")
        for i in range(n_recordings):
            add(f"free-spoken-digit-dataset-1.0.10/recordings/{i % 10}_s{chr(97 + i // 500)}_{i % 500}.wav")
    return buf.getvalue()


@pytest.mark.parametrize("n", [3000, 2999])
def test_download_extracts_only_recordings_and_checks_the_count(tmp_path, monkeypatch, n):
    blob = fake_archive(n)

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(W.urllib.request, "urlopen", lambda *a, **k: Response(blob))
    dest = tmp_path / "data" / "recordings"
    if n == 3000:
        W.download_fsdd(dest)
        names = sorted(p.name for p in dest.iterdir())
        assert len(names) == 3000 and all(W.FSDD_NAME.match(s) for s in names)
    else:
        with pytest.raises(W.RunError, match="2999 recordings"):
            W.download_fsdd(dest)
        assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if "evil" in p.name or p.suffix == ".tmp") == []
