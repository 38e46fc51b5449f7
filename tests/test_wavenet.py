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


def record_logits(monkeypatch):
    """Route W.sample_next through a recorder: returns the list of (B, Q) logits it saw."""
    seen, real = [], W.sample_next

    def recording(logits, temperature, generator):
        seen.append(logits.detach().clone())
        return real(logits, temperature, generator)
    monkeypatch.setattr(W, "sample_next", recording)
    return seen


@pytest.mark.parametrize("cond", [True, False])
def test_generate_matches_full_recomputation_step_by_step(monkeypatch, cond):
    """Catches `generate` feeding the wrong sample into the caches (the sample before
    last, a stale embedding) and a queue slot overwritten before it is read: on a tiny
    fp32 model with the same seeded generator, the cached sampler's logits at every step
    equal the full forward over the sequence it generated (within 1e-5), and its samples
    equal `naive_generate`'s, which recomputes the receptive field each step, for 300
    steps (the queues wrap many times: receptive field 32)."""
    model = small(cond).eval()
    digit, speaker = torch.tensor([1, 7, 3]), torch.tensor([0, 2, 1])
    seen = record_logits(monkeypatch)
    fast = W.generate(model, digit, speaker, 300, temperature=1.0, seed=5, show_progress=False)
    fast_steps = torch.stack(seen, 2)  # (B, Q, T)
    seen.clear()
    naive = W.naive_generate(model, digit, speaker, 300, temperature=1.0, seed=5)
    naive_steps = torch.stack(seen, 2)
    with torch.no_grad():
        full = model(fast, digit, speaker)  # teacher-forced on the fast sampler's own output
    assert len(set(fast[0].tolist())) > 50  # a near-uniform random net: varied samples
    torch.testing.assert_close(fast_steps, full, rtol=0, atol=1e-5)
    assert torch.equal(fast, naive)
    torch.testing.assert_close(naive_steps, full, rtol=0, atol=1e-5)


def test_generation_runs_with_tf32_off_and_restores_it(monkeypatch):
    """Catches the TF32 guard missing from the samplers: on recent GPUs cuDNN convolutions
    default to TF32 while the cached generator's matmuls are fp32, and fast and full logits
    would then differ far beyond 1e-5. (The flags can be set, and read, on a CPU.)"""
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    seen, real, before = [], W.sample_next, flags()
    monkeypatch.setattr(W, "sample_next", lambda *a: seen.append(flags()) or real(*a))
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        model, digit, speaker = small().eval(), torch.tensor([1]), torch.tensor([0])
        W.generate(model, digit, speaker, 3, show_progress=False)
        W.naive_generate(model, digit, speaker, 3)
        assert len(seen) == 6 and set(seen) == {(False, False)}
        assert flags() == (True, True)  # restored afterwards
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


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


def test_cosine_lr_warms_up_then_decays_to_zero():
    """Catches a schedule that returns the learning rate instead of the multiplier, a
    warm-up that starts at 0 (a wasted step) or never reaches 1, a decay that misses 0."""
    m = [W.cosine_lr(s, 110, warmup=10) for s in range(110)]
    assert m[0] == pytest.approx(0.1) and m[9] == m[10] == 1.0
    assert m[60] == pytest.approx(0.5) and 0 < m[-1] < 1e-3
    assert all(a >= b for a, b in zip(m[10:], m[11:]))
    assert W.cosine_lr(0, 5) == 1.0


def test_a_non_finite_loss_stops_training_before_it_reaches_a_file(tmp_path, monkeypatch):
    """Catches the loss being checked only on logged steps while checkpoints are written
    in between: the check must also run before every save. The loss turns NaN at step 3;
    saves at steps 2 and 4, a log every 25 steps: training stops with one error at step 4,
    and model.pt and train_state.pt still hold the finite weights of step 2."""
    train, _ = W.make_tones()
    speakers = sorted({s for _, _, s in train})
    args = W.parse_args(TINY + ["--steps", "6", "--save-every", "2", "--precision", "fp32"])
    real, calls = W.nll_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) >= 3 else 1.0)
    monkeypatch.setattr(W, "nll_loss", poisoned)
    model = W.build_model(vars(args), len(speakers))
    with pytest.raises(W.RunError, match="non-finite nll at step 4;"):
        W.train(model, train, speakers, args, torch.device("cpu"), out=tmp_path)
    saved = W.load_checkpoint(tmp_path / "model.pt")["model"]
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert W.load_checkpoint(tmp_path / "train_state.pt")["step"] == 2


def test_evaluate_in_padded_batches_equals_each_recording_alone():
    """Catches padding leaking into the test NLL (a mask dropped, or padded positions
    counted): recordings of 23 different lengths, evaluated in small padded batches, give
    the bits per sample of each recording run through the model alone."""
    train, test = W.make_tones()
    speakers = sorted({s for _, _, s in train})
    test = [(c[:300 + 37 * i], d, s) for i, (c, d, s) in enumerate(test[:23])]
    model = small(speakers=len(speakers)).eval()
    bits, count = W.evaluate(model, test, speakers, torch.device("cpu"), max_tokens=2048)
    nats = 0.0
    with torch.no_grad():
        for c, d, s in test:
            x = torch.from_numpy(c.astype(np.int64))[None]
            logits = model(x, torch.tensor([d]), torch.tensor([speakers.index(s)]))
            nats += torch.nn.functional.cross_entropy(logits, x, reduction="sum").item()
    assert count == sum(len(c) for c, _, _ in test)
    assert bits == pytest.approx(nats / count / math.log(2), rel=1e-6)


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
    judge = W.train_judge(train, 300, torch.device("cpu"), seed=0)  # once: the slow part
    decode = lambda c: W.mu_law_decode(torch.from_numpy(c.astype(np.int64))).numpy()
    truth = torch.tensor([d for _, d, _ in test])
    assert (W.judge_digits(judge, [decode(c) for c, _, _ in test], torch.device("cpu"))
            == truth).double().mean() >= 0.9
    pcm = W.to_pcm(torch.from_numpy(np.stack([c for c, _, _ in test]).astype(np.int64)))

    cpu = torch.device("cpu")
    right = W.judge_samples(judge, test, pcm, truth, "dark", cpu, tmp_path)
    wrong = W.judge_samples(judge, test, pcm, (truth + 1) % 10, "dark", cpu, tmp_path)
    assert right["judge_test_accuracy"] >= 0.9 and right["judge_sample_accuracy"] >= 0.9
    assert wrong["judge_sample_accuracy"] <= 0.2
    assert right["judge_sample_digits"] == wrong["judge_sample_digits"]  # same clips, same verdicts
    # spectrograms.png: one row per digit, a real clip then that digit's 4 "samples".
    with open(tmp_path / "spectrograms.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- command line

TINY = ["--data", "tones", "--steps", "3", "--channels", "8", "--skip-channels", "8",
        "--max-dilation", "16", "--test-limit", "6", "--gen-seconds", "0.05",
        "--naive-steps", "5", "--crop", "300", "--speaker", "dark", "--judge-steps", "50"]


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
    # --steps 3 caps the judge's training (asked: 50) and the naive timer (asked: 5).
    assert metrics["judge_train_steps"] == 3 and metrics["gen_naive_timed_steps"] == 3
    assert metrics["steps"] == 3 and metrics["precision"] in ("bf16", "fp32")
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
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
    # ... and writes its numbers to eval_metrics.json, never over a training run's metrics.json.
    assert json.loads((tmp_path / "again" / "eval_metrics.json").read_text()) == again
    assert not (tmp_path / "again" / "metrics.json").exists()


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
    # A damaged state of the right script: one line, not a traceback from inside torch.
    state = W.load_checkpoint(tmp_path / "c" / "train_state.pt")
    for damage, message in (({"step": "2"}, "damaged"), ({"model": {}}, "do not fit"),
                            ({"rng": "{"}, "damaged")):
        W.atomic_write(tmp_path / "c" / "train_state.pt",
                       lambda f: torch.save(dict(state, **damage), f))
        with pytest.raises(W.RunError, match=message):
            W.train(fresh(0), train, speakers, args, cpu, out=tmp_path / "c", resume=True)


@pytest.mark.parametrize("argv", [
    ["--lr", "-1"], ["--lr", "nan"], ["--steps", "0"], ["--steps", "2.5"], ["--batch-size", "0"],
    ["--crop", "0"], ["--channels", "0"], ["--skip-channels", "-4"], ["--cond-channels", "0"],
    ["--stacks", "0"], ["--max-dilation", "3"], ["--max-dilation", str(1 << 17)],
    ["--temperature", "0"], ["--temperature", "inf"], ["--gen-seconds", "0.00005"],
    ["--gen-seconds", "-1"], ["--num-samples", "0"], ["--naive-steps", "0"],
    ["--judge-steps", "-1"], ["--test-limit", "-1"], ["--warmup", "-1"], ["--save-every", "-1"],
    ["--precision", "fp16"], ["--device", "tpu"], ["--data", "mnist"], ["--sample-only"],
    ["--ckpt", "model.pt"], ["--sample-only", "--ckpt", "model.pt", "--resume"]])
def test_bad_flags_get_usage_and_one_error_line(argv, capsys):
    """Catches a flag that slips through unchecked (a negative --lr or --judge-steps, a
    --gen-seconds so small that nothing is generated and metrics.json gets NaN, a
    --max-dilation that is no power of 2): argparse's usage and one error line, exit 2."""
    with pytest.raises(SystemExit) as e:
        W.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].startswith("usage:")
    assert [line for line in err if "error:" in line] == err[-1:]


def test_data_dir_without_wavs_is_one_line_and_no_download(tmp_path, monkeypatch):
    """Catches a wrong --data-dir (a non-empty folder holding no wavs) starting a 10 MB
    download that then fails with 'could not unpack': one line naming the folder instead."""
    def no_download(*args, **kwargs):
        raise AssertionError("must not download")
    monkeypatch.setattr(W.urllib.request, "urlopen", no_download)
    wrong = tmp_path / "mnist"
    wrong.mkdir()
    (wrong / "train-images-idx3-ubyte.gz").write_bytes(b"not audio")
    with pytest.raises(SystemExit) as e:
        W.main(["--data-dir", str(wrong), "--out", str(tmp_path / "out")])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and str(wrong) in msg and "no .wav" in msg
    assert [p.name for p in wrong.iterdir()] == ["train-images-idx3-ubyte.gz"]


def test_out_naming_a_file_is_one_line(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    with pytest.raises(SystemExit) as e:
        W.main(TINY + ["--out", str(taken)])
    assert str(e.value.code).startswith("error: --out ") and "\n" not in str(e.value.code)
    assert taken.read_text() == "mine"


def test_damaged_checkpoints_are_one_line(tmp_path):
    """Catches a --sample-only checkpoint of the right script with a broken config or
    weights ending in a KeyError or RuntimeError from deep inside: one line each."""
    config = dict(vars(W.parse_args(TINY)), speakers=["bright", "dark"])
    weights = W.build_model(config, 2).state_dict()
    for name, cfg, state in (
            ("no_speakers", {k: v for k, v in config.items() if k != "speakers"}, weights),
            ("text_channels", dict(config, channels="8"), weights),
            ("odd_dilation", dict(config, max_dilation=12), weights),
            ("bad_condition", dict(config, condition="mood"), weights),
            ("wrong_size", dict(config, channels=16), weights),
            ("no_weights", config, {})):
        path = tmp_path / f"{name}.pt"
        W.save_checkpoint(path, state, cfg)
        with pytest.raises(SystemExit) as e:
            W.main(["--data", "tones", "--sample-only", "--ckpt", str(path),
                    "--out", str(tmp_path / "out"), "--judge-steps", "0"])
        msg = str(e.value.code)
        assert msg.startswith(f"error: {path}") and "\n" not in msg, (name, msg)
    assert not (tmp_path / "out" / "eval_metrics.json").exists()


def test_levels_of_clips_shorter_than_a_frame_are_finite():
    """Catches NaN in metrics.json when the samples are shorter than one 50 ms frame
    (--gen-seconds 0.01): the level of a 1-sample and a 399-sample clip is their RMS."""
    for n in (1, 399):
        level, active = W.rms_dbfs(np.full(n, 0.1))
        assert level == pytest.approx(-20.0, abs=1e-4) and active == 1.0


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
    users = tmp_path / "data" / "recordings.tmp"  # a user's own folder: must survive
    users.mkdir(parents=True)
    (users / "keep.txt").write_text("mine")
    if n == 3000:
        W.download_fsdd(dest)
        names = sorted(p.name for p in dest.iterdir())
        assert len(names) == 3000 and all(W.FSDD_NAME.match(s) for s in names)
    else:
        with pytest.raises(W.RunError, match="2999 recordings"):
            W.download_fsdd(dest)
        assert not dest.exists()
    assert (users / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.rglob("*")
                  if "evil" in p.name or (p.suffix == ".tmp" and p != users)) == []
