"""Tests of arith_coding.py: exact round trips, the code-length bound, the
quantiser, every model through the container, and the failure modes."""

import bisect
import json
import math
import random
import zlib

import numpy as np
import pytest
import torch

import arith_coding as ac

STDLIB = ac.stdlib_dir()
TEXT = (STDLIB / "argparse.py").read_bytes()[:6000] + (STDLIB / "json" / "decoder.py").read_bytes()[:6000]


def code_static(msg, freqs, precision):
    """Encode msg (symbol ids) under a static frequency table, decode it back.
    Returns (decoded, encoder, payload)."""
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + f)
    enc = ac.MeasuringEncoder(precision)
    for s in msg:
        enc.encode(cum[s], cum[s + 1], cum[-1])
    payload = enc.finish()
    dec = ac.ArithmeticDecoder(payload, precision)
    out = []
    for _ in msg:
        s = bisect.bisect_right(cum, dec.target(cum[-1])) - 1
        dec.consume(cum[s], cum[s + 1], cum[-1])
        out.append(s)
    return out, enc, payload


def assert_bound(enc, payload, msg, freqs, precision):
    """bits <= -log2 P(msg) + 2 + truncation slack; then < 8 bits of padding.
    Each sub-interval is truncated by < 1 unit of a range > 2^(precision-2):
    slack = sum_t -log2(1 - total / (2^(precision-2) f_t)), tiny but exact."""
    total = sum(freqs)
    slack = sum(-math.log2(1 - total / (2 ** (precision - 2) * freqs[s])) for s in msg)
    assert enc.bits_before_padding <= enc.ideal_bits + 2 + slack + 1e-9
    assert 0 <= 8 * len(payload) - enc.bits_before_padding < 8


def random_case(rng):
    v = rng.choice([1, 2, 3, 5, 17, 256])
    precision = rng.choice([16, 20, 24, 32, 48])
    kind = rng.choice(["uniform", "skewed", "degenerate"])
    # total <= 2^(precision - 6): the truncation slack of assert_bound stays finite
    cap = min(2 ** (precision - 6), 1 << 16) // v
    if kind == "uniform":
        freqs = [rng.randint(1, cap) for _ in range(v)]
    elif kind == "skewed":
        freqs = [max(1, int(cap * rng.random() ** 6)) for _ in range(v)]
    else:  # one symbol ~ probability 1, all others at the minimum frequency 1
        freqs = [1] * v
        freqs[rng.randrange(v)] = cap * v - v + 1 if v > 1 else 1
    n = rng.choice([0, 1, rng.randint(2, 40), rng.randint(40, 400)])
    msg = rng.choices(range(v), weights=freqs, k=n)
    if kind == "degenerate" and n:
        # make sure minimum-frequency symbols occur
        for i in rng.sample(range(n), min(n, 3)):
            msg[i] = rng.randrange(v)
    return msg, freqs, precision


def test_round_trip_and_bound_on_thousands_of_random_messages():
    rng = random.Random(1)
    for _ in range(2500):
        msg, freqs, precision = random_case(rng)
        out, enc, payload = code_static(msg, freqs, precision)
        assert out == msg
        assert_bound(enc, payload, msg, freqs, precision)


@pytest.mark.parametrize("v", [1, 2, 256])
def test_alphabets_empty_and_one_symbol(v):
    rng = random.Random(v)
    freqs = [rng.randint(1, 100) for _ in range(v)]
    for msg in ([], [v - 1], rng.choices(range(v), k=3000)):
        out, enc, payload = code_static(msg, freqs, 32)
        assert out == msg
        assert_bound(enc, payload, msg, freqs, 32)
    if v == 1:  # a certain symbol costs nothing: only the 2 final bits remain
        assert len(code_static([0] * 1000, freqs, 32)[2]) == 1


def test_long_runs_force_many_underflow_steps():
    """Coding the middle of three symbols (1/4, 1/2, 1/4) keeps the interval
    straddling 1/2 while it shrinks: every step is an underflow (E3) step."""
    msg = [1] * 20000 + [0] + [1] * 5000 + [2]
    freqs = [1, 2, 1]
    cum = [0, 1, 3, 4]
    enc = ac.ArithmeticEncoder(32)
    most_pending = 0
    for s in msg:
        enc.encode(cum[s], cum[s + 1], 4)
        most_pending = max(most_pending, enc.pending)
    assert most_pending >= 19000
    out, menc, payload = code_static(msg, freqs, 32)
    assert out == msg
    assert_bound(menc, payload, msg, freqs, 32)


def test_batched_renormalisation_gives_the_textbook_bits():
    """The reference-style coder renormalises one bit per loop; ours shifts all
    settled bits at once. Same model, same arithmetic: the same bytes."""
    data = TEXT[:3000]
    ref, _, _ = ac.reference_style_order0(data)
    ours, _ = ac.encode_with(ac.Order0Model(), data)
    assert ref == ours


def test_quantiser_properties():
    rng = np.random.default_rng(0)
    v = 256
    probs = rng.dirichlet(np.full(v, 0.05), size=200)
    probs[0] = 0.0
    probs[0, 7] = 1.0                       # a one-hot: 255 "impossible" symbols
    probs[1] = 1.0 / v                      # uniform
    for k in (8, 12, 16, 24):
        freq = ac.quantise(probs, k)
        assert freq.dtype == np.int64
        assert (freq.sum(-1) == 2 ** k).all()
        assert (freq >= 1).all()
        cum = ac.cumulative(freq)
        assert (np.diff(cum, axis=-1) > 0).all() and (cum[:, -1] == 2 ** k).all()
        # close to the float model: each count is within 2V of p 2^k
        assert np.abs(freq - probs * 2 ** k).max() <= 2 * v
        assert np.array_equal(freq, ac.quantise(probs, k))  # deterministic
    # the rounding loss in bits is small at k = 24: E_p[log2 p - log2 q]
    q = ac.quantise(probs, 24) / 2 ** 24
    loss = (probs * (np.log2(np.maximum(probs, 1e-300)) - np.log2(q))).sum(-1)
    assert loss.max() < 1e-3
    with pytest.raises(ValueError):
        ac.quantise(np.full(300, 1 / 300), 8)


def test_decoding_random_bits_is_an_exact_sample():
    """Random bits fed to the decoder give valid symbols, with frequencies
    matching the model: arithmetic decoding is inverse-CDF sampling."""
    freqs = [1, 30, 200, 25, 500]
    cum = [0] + np.cumsum(freqs).tolist()
    noise = np.random.default_rng(0).bytes(40000)
    dec = ac.ArithmeticDecoder(noise, 32)
    counts = np.zeros(len(freqs))
    for _ in range(20000):
        s = bisect.bisect_right(cum, dec.target(cum[-1])) - 1
        assert 0 <= s < len(freqs)
        dec.consume(cum[s], cum[s + 1], cum[-1])
        counts[s] += 1
    expected = 20000 * np.array(freqs) / sum(freqs)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20  # 4 degrees of freedom: P(chi2 > 20) < 0.001
    for name in ("order0", "context"):
        model = ac.Order0Model() if name == "order0" else ac.ContextModel()
        out = ac.decode_with(model, noise[:3000], 1000)
        assert len(out) == 1000


def args_for(*extra):
    return ac.parse_args(["compress", "in", "out", *extra])


@pytest.mark.parametrize("model", ["order0", "context"])
def test_models_round_trip_real_text(model):
    args = args_for("--model", model)
    measure = {}
    blob = ac.compress(TEXT, model, args, measure)
    assert ac.decompress(blob, args) == TEXT
    header, payloads = ac.unpack_archive(blob)
    # actual bits within 2 bits (+ padding, + tiny truncation) of the model's ideal
    assert measure["bits_before_padding"] <= measure["quantised_bits"] + 2.01
    if model == "context":  # PPM must beat both order 0 and zlib on source code
        order0 = ac.compress(TEXT, "order0", args_for())
        assert len(payloads[0]) < len(ac.unpack_archive(order0)[1][0])
        assert len(payloads[0]) < len(zlib.compress(TEXT, 9))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny GRU trained for 30 steps on real text: enough to round-trip."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("neural") / "model.pt"
    args = ac.parse_args(["train", "--hidden", "24", "--embed", "8", "--steps", "30",
                          "--batch-size", "8", "--seq-len", "64", "--lr", "1e-2"])
    model = ac.ByteGRU(args.hidden, args.embed)
    data = TEXT * 2
    first = ac.evaluate_bits(model, data, torch.device("cpu"))
    ac.train_model(model, data, args, torch.device("cpu"))
    assert ac.evaluate_bits(model, data, torch.device("cpu")) < first  # it learned something
    ac.save_checkpoint(path, model.state_dict(), vars(args))
    return path


def test_neural_round_trip_in_lockstep_streams(tiny_ckpt, tmp_path):
    src, arc, back = tmp_path / "in.py", tmp_path / "in.ac", tmp_path / "back.py"
    data = TEXT[:9000]  # 3 streams of 4096, 4096 and 808 bytes
    src.write_bytes(data)
    ac.main(["compress", str(src), str(arc), "--model", "neural", "--ckpt", str(tiny_ckpt),
             "--device", "cpu"])
    header, payloads = ac.unpack_archive(arc.read_bytes())
    assert header["model"] == "neural" and len(payloads) == 3
    ac.main(["decompress", str(arc), str(back), "--ckpt", str(tiny_ckpt), "--device", "cpu"])
    assert back.read_bytes() == data
    # the ideal code length from the float model matches the teacher-forced one
    args = ac.parse_args(["compress", "x", "y", "--ckpt", str(tiny_ckpt), "--device", "cpu"])
    measure = {}
    ac.compress(data, "neural", args, measure)
    model, _ = ac.load_neural(tiny_ckpt, torch.device("cpu"))
    forced = ac.evaluate_bits(model, data, torch.device("cpu"))
    assert abs(measure["float_bits"] - forced) < 1e-3 * forced
    assert abs(measure["quantised_bits"] - measure["float_bits"]) < 1e-3 * forced
    # sampling = decoding random bits: valid bytes of the requested length
    assert len(ac.sample_bytes("neural", 50, args)) == 50


def run_cli(capsys, *argv):
    """main(argv) -> (exit code, last line of stderr)."""
    try:
        ac.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=__import__("sys").stderr)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_container_failures_are_one_line_errors(tmp_path, capsys, tiny_ckpt):
    src, arc, back = tmp_path / "in.py", tmp_path / "in.ac", tmp_path / "back.py"
    src.write_bytes(TEXT[:2000])
    assert run_cli(capsys, "compress", str(src), str(arc), "--model", "order0")[0] == 0
    blob = arc.read_bytes()
    bad = tmp_path / "bad.ac"
    cases = {
        "damaged": blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:],     # payload bit flip
        "header fails": blob[:20] + bytes([blob[20] ^ 4]) + blob[21:],  # header bit flip
        "truncated": blob[:-5],
        "truncated ": blob[:7],
        "not an arith_coding archive": b"PK\x03\x04 a zip file, not ours",
        "not an arith_coding archive ": b"",
        "format version": blob[:4] + b"\x09" + blob[5:],
    }
    for expected, content in cases.items():
        bad.write_bytes(content)
        code, line = run_cli(capsys, "decompress", str(bad), str(back), "--force")
        assert code == 1 and line.startswith("error:") and expected.strip() in line, (expected, line)
        assert not back.exists()
    # a neural archive without its model, and with the wrong one
    assert run_cli(capsys, "compress", str(src), str(arc), "--model", "neural", "--force",
                   "--ckpt", str(tiny_ckpt), "--device", "cpu")[0] == 0
    code, line = run_cli(capsys, "decompress", str(arc), str(back), "--ckpt",
                         str(tmp_path / "missing.pt"), "--device", "cpu")
    assert code == 1 and "model.pt was not found" in line
    other = tmp_path / "other.pt"
    ac.save_checkpoint(other, ac.ByteGRU(24, 8).state_dict(), {"hidden": 24, "embed": 8})
    code, line = run_cli(capsys, "decompress", str(arc), str(back), "--ckpt", str(other),
                         "--device", "cpu")
    assert code == 1 and "is not the model" in line
    # missing input
    code, line = run_cli(capsys, "compress", str(tmp_path / "nope"), str(arc), "--force")
    assert code == 1 and "cannot read" in line


def test_existing_out_is_kept_without_force_and_tiny_inputs_work(tmp_path, capsys):
    for data in (b"", b"x", TEXT[:300]):
        for model in ("order0", "context"):
            src, arc, back = tmp_path / "in", tmp_path / "in.ac", tmp_path / "back"
            src.write_bytes(data)
            back.write_bytes(b"precious")
            assert run_cli(capsys, "compress", str(src), str(arc), "--model", model, "--force")[0] == 0
            code, line = run_cli(capsys, "decompress", str(arc), str(back))
            assert code == 1 and "exists" in line and back.read_bytes() == b"precious"
            assert run_cli(capsys, "decompress", str(arc), str(back), "--force")[0] == 0
            assert back.read_bytes() == data
    assert not list(tmp_path.glob("*.tmp"))


def test_train_smoke_writes_outputs_and_sample_only_reloads(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    i = held = 0
    while held < 2 or i < 30:  # enough files that the 1-in-20 split holds some out
        (corpus_dir / f"m{i}.py").write_bytes(TEXT[(i * 397) % 9000:][:1500])
        held += zlib.crc32(f"m{i}.py".encode()) % 20 == 0
        i += 1
    out = tmp_path / "run"
    common = ["--data-dir", str(corpus_dir), "--out", str(out), "--hidden", "16", "--embed", "8",
              "--test-limit", "3000", "--check-bytes", "300", "--num-samples", "40", "--device", "cpu"]
    metrics = ac.main(["train", "--steps", "2", "--batch-size", "4", "--seq-len", "32", *common])
    for name in ("model.pt", "metrics.json", "samples.txt"):
        assert (out / name).is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["heldout_bits_per_byte"] > 0
    assert len((out / "samples.txt").read_bytes()) == 40
    again = ac.main(["train", "--sample-only", "--ckpt", str(out / "model.pt"), *common])
    assert again["heldout_bits_per_byte"] == pytest.approx(metrics["heldout_bits_per_byte"])
