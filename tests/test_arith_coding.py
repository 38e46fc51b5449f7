"""Tests of arith_coding.py: the fast coder against the textbook coder, exact round
trips of every model on every byte value, the code-length bound, the quantiser, neural
tables that do not depend on the thread count, the memory budget, and every way an
archive can be wrong, damaged or hostile."""

import bisect
import json
import math
import os
import random
import struct
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import arith_coding as ac
from conftest import ROOT

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXT = (STDLIB / "argparse.py").read_bytes()[:6000] + (STDLIB / "json" / "decoder.py").read_bytes()[:6000]
ODD = [bytes(range(256)), bytes(range(255, -1, -1)) * 3,               # every byte value, both ways
       np.random.default_rng(5).bytes(3000),                           # random bytes
       bytes(5000) + b"\xff" + bytes(3000), b"\x80" * 2000]            # long runs, bytes >= 128
CPU = torch.device("cpu")
NEURAL_TEXT = TEXT[:2600]  # 3 streams of 1024, 1024 and 552 bytes at the tests' MIN_CHUNK


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Neural streams of at least 1024 bytes instead of 4096: the same coder, 4x faster tests."""
    monkeypatch.setattr(ac, "MIN_CHUNK", 1024)


class MeasuringEncoder(ac.ArithmeticEncoder):
    """Also adds up the ideal code length sum -log2(f / total) of what it is fed."""

    def __init__(self, state_bits=32):
        super().__init__(state_bits)
        self.ideal_bits = 0.0

    def encode(self, low_count, high_count, total):
        self.ideal_bits -= math.log2((high_count - low_count) / total)
        super().encode(low_count, high_count, total)


def byte_model(name):
    return ac.Order0Model() if name == "order0" else ac.ContextModel()


def code_static(msg, freqs, state_bits):
    """Encode msg (symbol ids) under a static frequency table, decode it back.
    Returns (decoded, encoder, payload)."""
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + f)
    enc = MeasuringEncoder(state_bits)
    for s in msg:
        enc.encode(cum[s], cum[s + 1], cum[-1])
    payload = enc.finish()
    dec = ac.ArithmeticDecoder(payload, state_bits)
    out = []
    for _ in msg:
        s = bisect.bisect_right(cum, dec.target(cum[-1])) - 1
        dec.consume(cum[s], cum[s + 1], cum[-1])
        out.append(s)
    return out, enc, payload


def assert_bound(enc, payload, msg, freqs, state_bits):
    """bits <= -log2 P(msg) + 2 + truncation slack; then < 8 bits of padding.
    Each sub-interval is truncated by < 1 unit of a range > 2^(state_bits-2):
    slack = sum_t -log2(1 - total / (2^(state_bits-2) f_t)), tiny but exact."""
    total = sum(freqs)
    slack = sum(-math.log2(1 - total / (2 ** (state_bits - 2) * freqs[s])) for s in msg)
    assert enc.bits_before_padding <= enc.ideal_bits + 2 + slack + 1e-9
    assert 0 <= 8 * len(payload) - enc.bits_before_padding < 8


def random_case(rng):
    v = rng.choice([1, 2, 3, 5, 17, 256])
    state_bits = rng.choice([16, 20, 24, 32, 48])
    kind = rng.choice(["uniform", "skewed", "degenerate"])
    # total <= 2^(state_bits - 6): the truncation slack of assert_bound stays finite
    cap = min(2 ** (state_bits - 6), 1 << 16) // v
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
        for i in rng.sample(range(n), min(n, 3)):  # make sure minimum-frequency symbols occur
            msg[i] = rng.randrange(v)
    return msg, freqs, state_bits


def test_round_trip_and_bound_on_thousands_of_random_messages():
    rng = random.Random(1)
    for _ in range(1500):
        msg, freqs, state_bits = random_case(rng)
        out, enc, payload = code_static(msg, freqs, state_bits)
        assert out == msg
        assert_bound(enc, payload, msg, freqs, state_bits)


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
    cum = [0, 1, 3, 4]
    enc = ac.ArithmeticEncoder(32)
    most_pending = 0
    for s in msg:
        enc.encode(cum[s], cum[s + 1], 4)
        most_pending = max(most_pending, enc.pending)
    assert most_pending >= 19000
    out, menc, payload = code_static(msg, [1, 2, 1], 32)
    assert out == msg
    assert_bound(menc, payload, msg, [1, 2, 1], 32)


def test_fast_coder_is_byte_identical_to_the_textbook_coder():
    """The specification test. Catches a wrong pending-bit polarity, a wrong
    count of settled or underflow bits, a wrong final flush (2 bits + pending)
    in the batched coder: its bytes must equal the bit-at-a-time coder's (on
    static tables, and through the adaptive byte models), and decode."""
    rng = random.Random(7)
    cases = [random_case(rng) for _ in range(300)]
    cases.append(([1] * 3000 + [0] + [1] * 500 + [2], [1, 2, 1], 32))   # underflow runs
    cases.append(([0] * 2000 + [1], [1, 1 << 20], 24))                  # near-certain symbols
    for msg, freqs, state_bits in cases:
        cum = [0] + np.cumsum(freqs).tolist()
        slow, fast = ac.TextbookEncoder(state_bits), ac.ArithmeticEncoder(state_bits)
        for s in msg:
            slow.encode(cum[s], cum[s + 1], cum[-1])
            fast.encode(cum[s], cum[s + 1], cum[-1])
        data = fast.finish()
        assert slow.finish() == data
        dec = ac.ArithmeticDecoder(data, state_bits)
        assert [dec.decode_symbol(cum) for _ in msg] == msg
    for name in ("order0", "context"):
        for data in ODD[:3] + [TEXT[:3000]]:
            slow, _ = ac.encode_with(byte_model(name), data, 32, ac.TextbookEncoder(32))
            assert slow == ac.encode_with(byte_model(name), data)[0]


def test_binary_and_table_helpers_of_the_shared_coder():
    """encode_bit / decode_bit / decode_symbol (what pixelcnn.py codes pixels
    with) invert each other, including probabilities next to 0 and 1."""
    rng = np.random.default_rng(3)
    bits = (rng.random(3000) < 0.9).astype(int).tolist() + [0, 1] * 20
    counts = [int(c) for c in rng.integers(1, 1 << 16, 3000)] + [1] * 20 + [(1 << 16) - 1] * 20
    enc = ac.ArithmeticEncoder(32)
    for b, c in zip(bits, counts):
        enc.encode_bit(b, c, 1 << 16)
    dec = ac.ArithmeticDecoder(enc.finish(), 32)
    assert [dec.decode_bit(c, 1 << 16) for c in counts] == bits
    cum = ac.cumulative(ac.quantise(rng.dirichlet(np.full(5, 0.3), 1), 12))[0]
    msg = rng.integers(0, 5, 500).tolist()
    enc = ac.ArithmeticEncoder(32)
    for s in msg:
        enc.encode(int(cum[s]), int(cum[s + 1]), int(cum[-1]))
    dec = ac.ArithmeticDecoder(enc.finish(), 32)
    assert [dec.decode_symbol(cum) for _ in msg] == msg


def test_order0_table_is_one_plus_the_counts_halved_at_the_limit():
    """The model's cumulative table against counts kept by hand, for every byte value,
    through several halvings. Catches an update of the wrong symbol's slice (cum[x:]
    for cum[x + 1:]), a halving that rounds down (a count of 0) or never happens."""
    model, freq, rng = ac.Order0Model(limit=3000), np.ones(256, np.int64), random.Random(2)
    enc = ac.ArithmeticEncoder(32)
    for step in range(6000):
        x = rng.choice([rng.randrange(256), 255, 200, 0])
        model.code(enc, x)
        freq[x] += 1
        if freq.sum() >= 3000:
            freq = (freq + 1) // 2
        assert step % 97 or np.array_equal(model.cum, ac.cumulative(freq))
    assert np.array_equal(model.cum, ac.cumulative(freq)) and freq.min() >= 1


@pytest.mark.parametrize("name", ["order0", "context"])
def test_every_byte_value_round_trips_through_the_byte_models(name):
    """bytes(range(256)), random bytes, long zero runs and runs of 0x80 through
    each adaptive model. Catches a model that mishandles bytes >= 128 or a
    decoder that finds the wrong symbol."""
    for data in ODD:
        payload, _ = ac.encode_with(byte_model(name), data)
        assert ac.decode_with(byte_model(name), payload, len(data)) == data


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
        assert np.abs(freq - probs * 2 ** k).max() <= 2 * v  # each count within 2V of p 2^k
        assert np.array_equal(freq, ac.quantise(probs, k))  # deterministic
    q = ac.quantise(probs, 24) / 2 ** 24  # the rounding loss in bits is small at k = 24
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
        s = dec.decode_symbol(cum)
        assert 0 <= s < len(freqs)
        counts[s] += 1
    expected = 20000 * np.array(freqs) / sum(freqs)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20  # 4 degrees of freedom: P(chi2 > 20) < 0.001
    for name in ("order0", "context"):
        assert len(ac.sample_bytes(byte_model(name), 1000)) == 1000


@pytest.mark.parametrize("model", ["order0", "context"])
def test_models_round_trip_real_text(model):
    blob = ac.compress(TEXT, model)
    assert ac.decompress(blob) == TEXT
    payload, enc = ac.encode_with(byte_model(model), TEXT, 32, MeasuringEncoder(32))
    assert ac.unpack_archive(blob)[1] == [payload]
    # actual bits within 2 bits (+ padding, + tiny truncation) of the model's ideal
    assert enc.bits_before_padding <= enc.ideal_bits + 2.01
    if model == "context":  # PPM must beat both order 0 and zlib on source code
        assert len(payload) < len(ac.encode_with(byte_model("order0"), TEXT)[0])
        assert len(payload) < len(zlib.compress(TEXT, 9))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny GRU trained for 50 steps on real text (4.6 bits a byte): it beats stored mode.
    Trained as the default run trains, in bf16 autocast, whose weights stay float32 (the
    coder computes its tables from them). Catches a model left in bf16 by training."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("neural") / "model.pt"
    model = ac.ByteGRU(24, 8)
    first = ac.evaluate_bits(model, TEXT[:3000], CPU)
    ac.train_model(model, TEXT * 2, 50, batch_size=8, seq_len=64, lr=2e-2, bf16=True)
    assert ac.evaluate_bits(model, TEXT[:3000], CPU) < first  # it learned something
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ac.save_checkpoint(path, {"hidden": 24, "embed": 8}, model.state_dict())
    return path


def neural_round_trip(model, data, lengths, k=20):
    encs = [MeasuringEncoder(32) for _ in lengths]
    ac.neural_code(model, CPU, encs, lengths, k, data)
    decs = [ac.ArithmeticDecoder(e.finish(), 32) for e in encs]
    return ac.neural_code(model, CPU, decs, lengths, k), encs


def test_neural_round_trip_and_code_length(tiny_ckpt, tmp_path):
    """Through the command line: 2,600 bytes in 3 lock-step streams of 1024, 1024 and
    552 bytes and back; the archive's payload is what the model's teacher-forced
    -log2 P says (+ < 0.1 % for the quantised tables, + 2 bits and padding a stream).
    Catches a decoder reading the wrong row of the table or mishandling the shorter
    last stream, a table from the wrong step, a quantiser that wastes bits."""
    src, arc, back = tmp_path / "in.py", tmp_path / "in.ac", tmp_path / "back.py"
    data = NEURAL_TEXT
    src.write_bytes(data)
    ac.main(["compress", str(src), str(arc), "--model", "neural", "--ckpt", str(tiny_ckpt),
             "--device", "cpu"])
    header, payloads = ac.unpack_archive(arc.read_bytes())
    assert header["model"] == "neural" and len(payloads) == 3 and header["k"] == 24
    ac.main(["decompress", str(arc), str(back), "--ckpt", str(tiny_ckpt), "--device", "cpu"])
    assert back.read_bytes() == data
    forced = ac.evaluate_bits(ac.load_gru(tiny_ckpt, CPU)[0], data, CPU)
    coded = 8 * sum(map(len, payloads))
    assert forced * 0.999 < coded < forced * 1.001 + 3 * 10


class RecordingEncoder(ac.ArithmeticEncoder):
    def __init__(self):
        super().__init__()
        self.events = []

    def encode(self, low_count, high_count, total):
        self.events.append((low_count, high_count, total))
        super().encode(low_count, high_count, total)


def test_coder_tables_are_the_models_predictions_at_each_step(tiny_ckpt):
    """Byte t is coded with the quantised P(x_t | x_<t) of the teacher-forced model, up
    to float noise between step-by-step and whole-sequence evaluation. Catches a table
    one step stale, a wrong START, a quantiser at another k."""
    model, data = ac.load_gru(tiny_ckpt, CPU)[0], NEURAL_TEXT[:600]
    rec = RecordingEncoder()
    ac.neural_code(model, CPU, [rec], [len(data)], 24, data)
    with torch.no_grad():
        logits = model(torch.tensor([[ac.START, *data[:-1]]]))[0][0]      # (T, V)
    want = ac.quantise(torch.softmax(logits.float(), -1).numpy(), 24)[np.arange(len(data)), list(data)]
    got = np.array([hi - lo for lo, hi, total in rec.events])
    assert len(got) == len(data) and {total for _, _, total in rec.events} == {1 << 24}
    assert (np.abs(got - want) <= 2 + 1e-5 * want).all()


def test_every_byte_value_round_trips_through_the_neural_coder(tiny_ckpt):
    """bytes(range(256)), random bytes, zero runs through the lock-step coder in
    1 and 2 streams (the second one shorter), bypassing stored mode."""
    model = ac.load_gru(tiny_ckpt, CPU)[0]
    for data in (bytes(range(256)), ODD[2][:400], bytes(300) + b"\xff" + bytes(200), b"\x80" * 300):
        for lengths in ([len(data)], ac.stream_lengths(len(data), 2, -(-len(data) * 3 // 5))):
            assert neural_round_trip(model, data, lengths)[0] == data


def test_neural_tables_do_not_depend_on_the_thread_count(tmp_path):
    """A separate process compresses at OMP_NUM_THREADS=2, in 3, 7 and 10 streams of 160
    bytes (hidden 512: there threads change the float sums at some batch sizes); this
    one decodes at 1 thread, bit for bit; the caller's thread setting comes back.
    Catches a coder that runs at the caller's thread count (7 and 10 streams then
    differ on a 2-core EPYC), and one that leaves torch at its own count."""
    torch.manual_seed(0)
    model = ac.ByteGRU(512, 64)
    with torch.no_grad():
        model.head.bias[list(b"ab")] += 8.0  # about 1 bit a byte on a, b text: beats stored mode
    ckpt, rng, jobs = tmp_path / "model.pt", np.random.default_rng(0), []
    ac.save_checkpoint(ckpt, {"hidden": 512, "embed": 64}, model.state_dict())
    for streams in (3, 7, 10):
        (tmp_path / f"in{streams}").write_bytes(rng.choice(list(b"ab"), 160 * streams - 10).astype(np.uint8).tobytes())
        jobs.append(["compress", str(tmp_path / f"in{streams}"), str(tmp_path / f"in{streams}.ac"), "--model",
                     "neural", "--ckpt", str(ckpt), "--device", "cpu", "--streams", str(streams)])
    code = "import json, sys, arith_coding as ac\nac.MIN_CHUNK = 160\nfor a in json.loads(sys.argv[1]): ac.main(a)"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2"))
    assert done.returncode == 0, done.stderr
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for streams in (3, 7, 10):
            blob = (tmp_path / f"in{streams}.ac").read_bytes()
            header = ac.unpack_archive(blob)[0]
            assert header["model"] == "neural" and len(header["streams"]) == streams
            assert ac.decompress(blob, ckpt, "cpu") == (tmp_path / f"in{streams}").read_bytes()
        torch.set_num_threads(3)
        ac.sample_bytes(ac.ByteGRU(8, 4), 3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(caller)


def neural_archive(tiny_ckpt, data=NEURAL_TEXT):
    blob = ac.compress(data, "neural", ckpt=tiny_ckpt, device="cpu")
    assert ac.unpack_archive(blob)[0]["model"] == "neural"  # not stored: the tiny model compresses
    return blob


def craft(header, body, version=ac.VERSION):
    """An archive with this header and payload (a hostile file)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return ac.MAGIC + bytes([version]) + struct.pack(">I", len(text)) + text + body


def run_cli(capsys, *argv):
    """main(argv) -> (exit code, last line of stderr)."""
    try:
        ac.main(list(map(str, argv)))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_other_kernels_or_torch_are_refused_before_decoding(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A neural archive whose recorded torch, device, kernels or probe tables differ
    from this machine's is refused before any byte is decoded, in one line that names
    what differs (and not what agrees). Catches a missing or late check, and a
    message that names the machine it runs on as the one to decode on."""
    blob = neural_archive(tiny_ckpt)
    header, payloads = ac.unpack_archive(blob)
    here = header["fingerprint"]
    calls = []
    real = ac.neural_code
    monkeypatch.setattr(ac, "neural_code", lambda *a, **k: calls.append(1) or real(*a, **k))
    back = tmp_path / "back"
    for key, value in (("kernel", "arm64 NEON"), ("device", "cuda"), ("torch", "1.0.0"),
                       ("probe_sha256", "0" * 32)):  # the probe changes too, but torch explains it
        bad = dict(header, fingerprint={**here, "probe_sha256": "0" * 32, key: value})
        (tmp_path / "bad.ac").write_bytes(craft(bad, b"".join(payloads)))
        code, line = run_cli(capsys, "decompress", tmp_path / "bad.ac", back, "--ckpt", tiny_ckpt,
                             "--device", "cpu")
        assert code == 1 and "cannot be decoded here" in line and f"{key} {value} there" in line, line
        assert f"{here[key]} here" in line and line.count(" there") == 1 and not calls
        assert not back.exists()
    (tmp_path / "good.ac").write_bytes(blob)
    assert run_cli(capsys, "decompress", tmp_path / "good.ac", back, "--ckpt", tiny_ckpt,
                   "--device", "cpu")[0] == 0
    assert back.read_bytes() == NEURAL_TEXT and calls


def counting(monkeypatch, cls):
    """Count cls.code calls; fail the test past 10^6 (an unbounded decode)."""
    seen = {"symbols": 0, "models": []}
    real_code, real_init = cls.code, cls.__init__

    def code(self, coder, x=None):
        seen["symbols"] += 1
        if seen["symbols"] > 10 ** 6:
            pytest.fail("decoding ran on past a million symbols")
        return real_code(self, coder, x)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        seen["models"].append(self)

    monkeypatch.setattr(cls, "code", code)
    monkeypatch.setattr(cls, "__init__", init)
    return seen


@pytest.mark.parametrize("name", ["order0", "context"])
def test_crafted_bomb_is_refused_after_a_bounded_number_of_symbols(name, monkeypatch, capsys, tmp_path):
    """A valid payload whose header claims more bytes than it holds (3 x, or 10^12)
    stops once the decoder reads past the end of the payload, soon after the real
    bytes: counted in symbols and table entries, not seconds. Catches a decoder that
    reads zeros past the end forever."""
    data = TEXT[:2000]
    header, payloads = ac.unpack_archive(ac.compress(data, name))
    seen = counting(monkeypatch, ac.Order0Model if name == "order0" else ac.ContextModel)
    for claim in (10 ** 12, len(data) * 3):
        seen["symbols"] = 0
        (tmp_path / "bomb.ac").write_bytes(craft(dict(header, length=claim), payloads[0]))
        code, line = run_cli(capsys, "decompress", tmp_path / "bomb.ac", tmp_path / "out")
        assert code == 1 and "payload ends" in line, line
        assert seen["symbols"] <= len(data) + 200 and not (tmp_path / "out").exists()
    if name == "context":  # tables hold at most (order + 1) contexts per decoded symbol
        model = seen["models"][-1]
        assert sum(map(len, model.tables)) <= 11 * (len(data) + 200)
        assert len(model.match_table) <= len(data) + 200


def test_max_size_caps_the_output(tmp_path, capsys):
    src, arc = tmp_path / "in", tmp_path / "in.ac"
    src.write_bytes(TEXT[:3000])
    assert run_cli(capsys, "compress", src, arc, "--model", "order0")[0] == 0
    code, line = run_cli(capsys, "decompress", arc, tmp_path / "out", "--max-size", 2999)
    assert code == 1 and "--max-size" in line and not (tmp_path / "out").exists()
    assert run_cli(capsys, "decompress", arc, tmp_path / "out", "--max-size", 3000)[0] == 0


BAD_HEADERS = [  # (model, change, words of the error line)
    ("order0", {"length": "500"}, "not a int"), ("order0", {"length": 500.0}, "not a int"),
    ("order0", {"length": True}, "not a int"), ("order0", {"length": -1}, "out of range"),
    ("order0", {"crc32": -5}, "out of range"), ("order0", {"streams": [1, 2]}, "streams"),
    ("order0", {"streams": ["a"]}, "streams"), ("order0", {"streams": 5}, "not a list"),
    ("order0", {"model": "lz77"}, "no model"), ("order0", {"length": None}, "'length'"),
    ("context", {"order": -1}, "out of range"), ("context", {"order": None}, "'order'"),
    ("context", {"min_match": 0}, "out of range"), ("context", {"memory_mb": "big"}, "not a int"),
    ("context", {"memory_mb": 0}, "out of range"), ("context", {"memory_mb": 2000}, "--memory-mb 2000"),
    ("neural", {"k": 40}, "'k'"), ("neural", {"ckpt_sha256": None}, "ckpt_sha256"),
    ("neural", {"chunk": 0}, "out of range"), ("neural", {"chunk": 10}, "streams"),
    ("neural", {"fingerprint": {"a": 1, "b": 2, "c": 3, "d": 4}}, "torch None there"),
    ("neural", {"fingerprint": "x"}, "fingerprint"), ("neural", {"threads": 0, "k": 2}, "'k'"),
    ("neural", {"length": 10 ** 12, "chunk": 10 ** 12 // 2 + 1}, "'streams'"),  # a neural bomb
    ("neural", {"length": 10 ** 12, "chunk": 10 ** 12 // 3 + 1}, "payload ends"),
    ("stored", {"crc32": 1.5}, "not a int"), ("stored", {"crc32": 7}, "CRC"),
]


def test_every_crafted_header_field_is_refused_in_one_line(tiny_ckpt, tmp_path, capsys):
    """Each field of each model's header with a wrong type or range, a missing
    field, deeply nested JSON: one line, exit 1, no output file, no traceback.
    Catches any field used before it is checked (bool as int, str as int...)."""
    good = {name: ac.unpack_archive(ac.compress(TEXT[:500], name)) for name in ("order0", "context")}
    good["neural"] = ac.unpack_archive(neural_archive(tiny_ckpt))
    good["stored"] = ac.unpack_archive(ac.compress(bytes(range(256)), "order0"))
    assert good["stored"][0]["model"] == "stored"
    out = tmp_path / "out"
    cases = [(craft(dict(good[m][0], **change), b"".join(good[m][1])), words)
             for m, change, words in BAD_HEADERS]
    cases += [(craft(b"[" * 30000 + b"]" * 30000, b""), "not valid JSON"),
              (craft(b"{\"model\": \"order0\", \"length\": 1" + b"0" * 5000 + b"}", b""), "JSON"),
              (craft(b"[1, 2]", b""), "no model"),
              (craft({k: v for k, v in good["order0"][0].items() if k != "crc32"},
                     good["order0"][1][0]), "'crc32'"),
              (ac.MAGIC + bytes([ac.VERSION]) + struct.pack(">I", 1 << 30), "truncated")]
    for blob, words in cases:
        (tmp_path / "bad.ac").write_bytes(blob)
        code, line = run_cli(capsys, "decompress", tmp_path / "bad.ac", out, "--ckpt", tiny_ckpt,
                             "--device", "cpu")
        assert code == 1 and line.startswith("error:") and words in line, (words, line)
        assert not out.exists()


def test_a_users_tmp_file_is_never_touched_and_failures_leave_nothing(tmp_path, capsys):
    """The temporary file of a write is never a user's own OUT.tmp, and a failed
    run leaves neither OUT nor a stray temporary file."""
    src, arc, back = tmp_path / "in", tmp_path / "in.ac", tmp_path / "back"
    src.write_bytes(TEXT[:1000])
    (tmp_path / "in.ac.tmp").write_bytes(b"mine")
    assert run_cli(capsys, "compress", src, arc)[0] == 0
    assert run_cli(capsys, "decompress", arc, back)[0] == 0 and back.read_bytes() == TEXT[:1000]
    assert (tmp_path / "in.ac.tmp").read_bytes() == b"mine"
    before = sorted(p.name for p in tmp_path.iterdir())
    arc.write_bytes(arc.read_bytes()[:-3])
    assert run_cli(capsys, "decompress", arc, tmp_path / "never")[0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_memory_budget_resets_identically_and_round_trips():
    """A small budget makes the context model forget its tables several times;
    encoder and decoder forget at the same symbol (the round trip stays exact)
    and, all along, the model's count of its bytes is what its tables hold and
    stays under the budget. Catches a budget never enforced, a count that
    drifts from the tables (a repeated match key counted twice), and a reset
    that keeps its count."""
    data = TEXT + TEXT[:500] * 40  # fresh text (resets every ~2 KB), then repeats inside a stretch
    enc_model, enc = ac.ContextModel(memory_mb=1), ac.ArithmeticEncoder(32)
    for i, x in enumerate(data):
        enc_model.code(enc, x)
        if i % 997 == 0 or i == len(data) - 1:
            nodes = sum(map(len, enc_model.tables))
            pairs = sum(len(node) // 2 for t in enc_model.tables for node in t.values())
            assert enc_model.used == (nodes * ac.NODE_BYTES + pairs * ac.PAIR_BYTES + len(enc_model.data)
                                      + len(enc_model.match_table) * ac.MATCH_BYTES) <= 1 << 20
    payload = enc.finish()
    assert enc_model.resets >= 2
    dec_model = ac.ContextModel(memory_mb=1)
    assert ac.decode_with(dec_model, payload, len(data)) == data
    assert dec_model.resets == enc_model.resets and dec_model.used == enc_model.used
    large = ac.ContextModel(memory_mb=1 << 20)
    assert ac.encode_with(large, data)[0] != payload and large.resets == 0 and large.used > 1 << 20


def test_memory_budget_is_written_in_the_archive_and_honoured(tmp_path, capsys):
    """compress --memory-mb N writes N in the archive; decompress decodes with that
    budget, and refuses in one line an archive whose budget is more than it allows
    (--memory-mb, 700 by default, as xz -9 asks about 674 MB). Catches a budget not
    recorded (the decoder would reset elsewhere) and one a crafted archive can raise."""
    src, arc, back = tmp_path / "in", tmp_path / "in.ac", tmp_path / "back"
    src.write_bytes(TEXT[:4000])
    for budget, allowed, ok in ((1, None, True), (900, None, False), (900, 900, True)):
        assert run_cli(capsys, "compress", src, arc, "--memory-mb", budget, "--force")[0] == 0
        assert ac.unpack_archive(arc.read_bytes())[0]["memory_mb"] == budget
        code, line = run_cli(capsys, "decompress", arc, back, "--force",
                             *(["--memory-mb", allowed] if allowed else []))
        assert (code == 0) == ok and (ok or f"--memory-mb {budget}" in line and "allows (700)" in line)
        assert not ok or back.read_bytes() == src.read_bytes()
    assert ac.unpack_archive(ac.compress(TEXT[:500], "context"))[0]["memory_mb"] == 700


@pytest.mark.parametrize("name", ["order0", "context"])
def test_incompressible_input_is_stored_within_the_stated_overhead(name):
    """Random bytes would expand under any model: the archive is stored mode,
    at most STORED_OVERHEAD (50) bytes larger, and decodes. Catches a missing
    stored mode or a header that grew."""
    for data in (np.random.default_rng(1).bytes(6000), b"", b"x"):
        blob = ac.compress(data, name)
        assert ac.unpack_archive(blob)[0]["model"] == "stored"
        assert len(blob) - len(data) <= ac.STORED_OVERHEAD == 50
        assert ac.decompress(blob) == data


BAD_FLAGS = [
    (["compress", "a", "b", "--model", "neural", "--k", "40"], "--k"),
    (["compress", "a", "b", "--model", "neural", "--streams", "0"], "--streams"),
    (["compress", "a", "b", "--order", "-1"], "--order"),
    (["compress", "a", "b", "--memory-mb", "0"], "--memory-mb"),
    (["decompress", "a", "b", "--max-size", "-1"], "--max-size"),
    (["train", "--steps", "0"], "--steps"), (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "nan"], "--lr"), (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--test-limit", "-1"], "--test-limit"),
    (["train", "--sample-only", "--hidden", "8"], "--hidden"),
    (["sample", "--num-samples", "-1"], "--num-samples"),
    (["compress", "a", "b", "--model", "zip"], "--model"), (["bench"], "bench"),
]


@pytest.mark.parametrize("argv,words", BAD_FLAGS)
def test_bad_flags_get_usage_and_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        ac.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].startswith("usage:") and words in err[-1], err[-1]


def test_help_lists_every_command_and_every_default(capsys):
    """--help names the four commands with a line each; every flag of every command
    shows its default; no command is the default run, train."""
    with pytest.raises(SystemExit):
        ac.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, line in ac.COMMANDS.items():
        assert f"{name} {line}" in text
    for name in ac.COMMANDS:
        with pytest.raises(SystemExit):
            ac.parse_args([name, "--help"])
        options = capsys.readouterr().out.split("options:")[1].split("\n  -")[2:]  # past -h
        assert options and all("(default:" in o for o in options), name
    assert ac.parse_args([]).command == "train"


def test_container_failures_are_one_line_errors(tmp_path, capsys, tiny_ckpt):
    src, arc, back = tmp_path / "in.py", tmp_path / "in.ac", tmp_path / "back.py"
    src.write_bytes(TEXT[:2000])
    assert run_cli(capsys, "compress", src, arc, "--model", "order0")[0] == 0
    blob = arc.read_bytes()
    bad = tmp_path / "bad.ac"
    cases = {
        "damaged": blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:],     # payload bit flip
        "not valid JSON": blob[:9] + b"#" + blob[10:],                 # header damaged
        "truncated": blob[:-5],
        "truncated ": blob[:7],
        "not an arith_coding archive": b"PK\x03\x04 a zip file, not ours",
        "not an arith_coding archive ": b"",
        "format version 9": blob[:4] + b"\x09" + blob[5:],
    }
    for expected, content in cases.items():
        bad.write_bytes(content)
        code, line = run_cli(capsys, "decompress", bad, back, "--force")
        assert code == 1 and line.startswith("error:") and expected.strip() in line, (expected, line)
        assert not back.exists()
    # a neural archive without its model, with the wrong one, with broken ones
    src.write_bytes(NEURAL_TEXT)  # long enough for the tiny model to beat stored mode
    assert run_cli(capsys, "compress", src, arc, "--model", "neural", "--force",
                   "--ckpt", tiny_ckpt, "--device", "cpu")[0] == 0
    code, line = run_cli(capsys, "decompress", arc, back, "--ckpt", tmp_path / "missing.pt")
    assert code == 1 and "missing.pt: not a usable arith_coding.py checkpoint" in line
    other = tmp_path / "other.pt"
    ac.save_checkpoint(other, {"hidden": 24, "embed": 8}, ac.ByteGRU(24, 8).state_dict())
    code, line = run_cli(capsys, "decompress", arc, back, "--ckpt", other, "--device", "cpu")
    assert code == 1 and "is not the model" in line
    for config, state in (({"hidden": "24", "embed": 8}, {}), ({"hidden": 24, "embed": 8}, {"x": torch.zeros(1)})):
        ac.save_checkpoint(other, config, state)
        code, line = run_cli(capsys, "compress", src, arc, "--model", "neural", "--force", "--ckpt", other)
        assert code == 1 and "not a usable" in line
    other.write_bytes(other.read_bytes()[:100])
    assert "not a usable" in run_cli(capsys, "compress", src, arc, "--model", "neural", "--force",
                                     "--ckpt", other)[1]
    code, line = run_cli(capsys, "compress", tmp_path / "nope", arc, "--force")
    assert code == 1 and "No such file" in line


def test_existing_out_is_kept_without_force_and_tiny_inputs_work(tmp_path, capsys):
    for data in (b"", b"x", TEXT[:300]):
        for model in ("order0", "context"):
            src, arc, back = tmp_path / "in", tmp_path / "in.ac", tmp_path / "back"
            src.write_bytes(data)
            back.write_bytes(b"precious")
            assert run_cli(capsys, "compress", src, arc, "--model", model, "--force")[0] == 0
            code, line = run_cli(capsys, "decompress", arc, back)
            assert code == 1 and "exists" in line and back.read_bytes() == b"precious"
            assert run_cli(capsys, "decompress", arc, back, "--force")[0] == 0
            assert back.read_bytes() == data
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_train_smoke_writes_outputs_and_sample_only_beside_it(tmp_path, capsys):
    corpus_dir = tmp_path / "corpus"
    (corpus_dir / "site-packages").mkdir(parents=True)
    (corpus_dir / "site-packages" / "skipped.py").write_bytes(b"x" * 100000)
    i = held = 0
    while held < 2 or i < 30:  # enough files that the 1-in-20 split holds some out
        (corpus_dir / f"m{i}.py").write_bytes(TEXT[(i * 397) % 9000:][:1500])
        held += zlib.crc32(f"m{i}.py".encode()) % 20 == 0
        i += 1
    out = tmp_path / "run"
    common = ["--data-dir", str(corpus_dir), "--test-limit", "3000", "--check-bytes", "300",
              "--num-samples", "40", "--device", "cpu"]
    metrics = ac.main(["train", "--out", str(out), "--steps", "2", "--batch-size", "4", "--seq-len", "32",
                       "--hidden", "16", "--embed", "8", *common])
    for name in ("model.pt", "metrics.json", "samples.txt"):
        assert (out / name).is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["heldout_bits_per_byte"] > 0 and saved["check_bytes"] == 300
    assert saved["train_bytes"] == (i - held) * 1500 and len((out / "samples.txt").read_bytes()) == 40
    again = ac.main(["train", "--sample-only", "--ckpt", str(out / "model.pt"), *common])
    assert again["heldout_bits_per_byte"] == pytest.approx(metrics["heldout_bits_per_byte"])
    assert (out / "sample_only" / "metrics.json").is_file()
    code, line = run_cli(capsys, "train", "--sample-only", "--ckpt", out / "model.pt", "--out", out, *common)
    assert code == 1 and "holds a training run" in line
    (tmp_path / "file").write_bytes(b"")
    code, line = run_cli(capsys, "train", "--out", tmp_path / "file", "--steps", "1", *common)
    assert code == 1 and "File exists" in line
