"""Tests of arith_coding.py: the fast coder against the textbook coder, exact round
trips of every model on every byte value, the code-length bound, the quantiser,
the container and every way an archive can be wrong, damaged or hostile."""

import bisect
import json
import math
import random
import struct
import zlib

import numpy as np
import pytest
import torch

import arith_coding as ac

STDLIB = ac.stdlib_dir()
TEXT = (STDLIB / "argparse.py").read_bytes()[:6000] + (STDLIB / "json" / "decoder.py").read_bytes()[:6000]
ODD = [bytes(range(256)), bytes(range(255, -1, -1)) * 3,               # every byte value, both ways
       np.random.default_rng(5).bytes(3000),                           # random bytes
       bytes(5000) + b"\xff" + bytes(3000), b"\x80" * 2000]            # long runs, bytes >= 128
V2_ARCHIVES = {  # made by the version-2 script (commit 5c67b8b) from STDLIB/argparse.py[:400], --precision 30
    "order0": (
        "41435059020000006c7b226372633332223a343133393436393937392c226c656e677468223a3430302c226d6f64656c"
        "223a226f7264657230222c227061796c6f61645f6372633332223a343134363335373239362c22707265636973696f6e"
        "223a33302c2273747265616d73223a5b3239375d7d5630502d232022ce5ebac5fefcd547d2cb78fcf3aeb1d6ed42385a"
        "daf52946737a2667993256b40b3b5cef41e99128ae3420e84f794f18aec77ec9e12ea6b09a3bc6656bb88a03885cb6da"
        "d50ff0ee3028a57c384c3c36a210e9deec8946cdf1ba729051919612fd52c16649ac8b4affdb3de5ae5b1e1a0fad12cb"
        "f7b5bb2665e261e0ddd4273ceeac584c342ed13bd1d1246c47156cb330f5d0e0bd6ae42602cf9daa12eab48da43b427e"
        "2c8da6722c2e60e52ea9e3a6fa4e53173d99a6009b69891cd3450cd1eeffd78ba20ff19db080ecc52771ad6e03557bf8"
        "7d9ada8ddcce606613628c0cb5b06449ffe9f24f854d96503d5233112fa9a5610144bc853df8c445386d692e92b5579c"
        "c85d985ab6b876e59068c23e963bd17133083ab833b72b866d6c8f55ad5bc68d0146"
    ),
    "context": (
        "4143505902000000877b226372633332223a343133393436393937392c226c656e677468223a3430302c226d696e5f6d"
        "61746368223a36342c226d6f64656c223a22636f6e74657874222c226f72646572223a31302c227061796c6f61645f63"
        "72633332223a313637363132373534352c22707265636973696f6e223a33302c2273747265616d73223a5b3233355d7d"
        "73cdbf442390606f0eada794e6cd49683eb218c3f4bcf29156ea9facdfc01fda997e8e3d507dbef51daa95b363c33b0c"
        "a03b054a8b69840d738d56a33c191fb723f02728d278bd922efcf97a38bc0c4326bf24914f918e08821d93e3b3bd354f"
        "7d118da232385a12c33150bfdc6d0bf184c14be66287be5b2b4e4ba2dc83807953b585a3ab4fd0a90b8c2d7d7164b64f"
        "04cc264e8b78c29dc8531fe37de0a8ac08d72f985c879a14ed6165902f66f97f7c7b6bc7184f1c155df7dde88935b46b"
        "c875851c2ef6bbb05f72b410e9b2254ec9917f45c1f6e4fce4cd304527a57d69b8d0076671494766d39a1a6e32a548"
    ),
}


def code_static(msg, freqs, state_bits):
    """Encode msg (symbol ids) under a static frequency table, decode it back.
    Returns (decoded, encoder, payload)."""
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + f)
    enc = ac.MeasuringEncoder(state_bits)
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


def both_coders(events, state_bits):
    """events: [(lo, hi, total)] -> (textbook bytes, fast bytes)."""
    slow, fast = ac.TextbookEncoder(state_bits), ac.ArithmeticEncoder(state_bits)
    for e in events:
        slow.encode(*e)
        fast.encode(*e)
    return slow.finish(), fast.finish()


def test_fast_coder_is_byte_identical_to_the_textbook_coder():
    """The specification test. Catches a wrong pending-bit polarity, a wrong
    count of settled or underflow bits, a wrong final flush (2 bits + pending)
    in the batched coder: its bytes must equal the bit-at-a-time coder's, and
    the textbook decoder must read the fast coder's stream back."""
    rng = random.Random(7)
    cases = [random_case(rng) for _ in range(300)]
    cases.append(([1] * 3000 + [0] + [1] * 500 + [2], [1, 2, 1], 32))   # underflow runs
    cases.append(([0] * 2000 + [1], [1, 1 << 20], 24))                  # near-certain symbols
    for msg, freqs, state_bits in cases:
        cum = [0] + np.cumsum(freqs).tolist()
        events = [(cum[s], cum[s + 1], cum[-1]) for s in msg]
        slow, fast = both_coders(events, state_bits)
        assert slow == fast
        dec = ac.TextbookDecoder(fast, state_bits)
        for lo, hi, total in events:
            assert lo <= dec.target(total) < hi
            dec.consume(lo, hi, total)
    for data in ODD + [TEXT[:3000]]:  # adaptive order 0 on bytes, both coders
        slow, _ = ac.encode_with(ac.Order0Model(), data, 32, ac.TextbookEncoder(32))
        fast, _ = ac.encode_with(ac.Order0Model(), data)
        assert slow == fast


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


def naive_order0_cum(freq):
    return [0] + np.cumsum(freq).tolist()


def test_order0_fenwick_tree_equals_the_naive_cumulative_table():
    """Fast path against its naive reference: the tree's prefix sums and the
    decoder's descent against a table rebuilt from the counts, after updates and
    halvings, for every byte value. Catches the descent starting at 64 instead
    of 128 (bytes >= 128 never found) and a wrong lowbit step."""
    model = ac.Order0Model(limit=3000)
    rng = random.Random(2)
    for step in range(4000):
        cum = naive_order0_cum(model.freq)
        assert model.total == cum[-1]
        if step % 97 == 0:
            assert [model.cum_low(s) for s in range(256)] == cum[:-1]
            for c in (0, cum[-1] - 1, cum[128], cum[200] - 1, rng.randrange(cum[-1])):
                dec = type("Fixed", (), {"target": lambda self, t, c=c: c,
                                         "consume": lambda self, lo, hi, t: None})()
                probe = ac.Order0Model()
                probe.freq, probe.tree, probe.total = list(model.freq), list(model.tree), model.total
                assert probe.decode(dec) == bisect.bisect_right(cum, c) - 1
        model._update(rng.choice([rng.randrange(256), 255, 200, 0]))


@pytest.mark.parametrize("name", ["order0", "context"])
def test_every_byte_value_round_trips_through_the_byte_models(name):
    """bytes(range(256)), random bytes, long zero runs and runs of 0x80 through
    each adaptive model. Catches the Fenwick descent starting at 64 (every
    ASCII-only test passed with it) and any model that mishandles bytes >= 128."""
    for data in ODD:
        model = ac.make_byte_model(name)
        payload, _ = ac.encode_with(model, data)
        assert ac.decode_with(ac.make_byte_model(name), payload, len(data)) == data


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
        assert len(ac.decode_with(ac.make_byte_model(name), noise[:20000], 1000)) == 1000


def args_for(*extra):
    return ac.parse_args(["compress", "in", "out", *extra])


@pytest.mark.parametrize("model", ["order0", "context"])
def test_models_round_trip_real_text(model):
    measure = {}
    blob = ac.compress(TEXT, model, measure=measure)
    assert ac.decompress(blob) == TEXT
    header, payloads = ac.unpack_archive(blob)
    # actual bits within 2 bits (+ padding, + tiny truncation) of the model's ideal
    assert measure["bits_before_padding"] <= measure["quantised_bits"] + 2.01
    if model == "context":  # PPM must beat both order 0 and zlib on source code
        order0 = ac.compress(TEXT, "order0")
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
    measure = {}
    ac.compress(data, "neural", ckpt=tiny_ckpt, device="cpu", measure=measure)
    model, _ = ac.load_neural(tiny_ckpt, torch.device("cpu"))
    forced = ac.evaluate_bits(model, data, torch.device("cpu"))
    assert abs(measure["float_bits"] - forced) < 1e-3 * forced
    assert abs(measure["quantised_bits"] - measure["float_bits"]) < 1e-3 * forced
    assert len(ac.sample_bytes("neural", 50, ckpt=tiny_ckpt, device="cpu")) == 50  # decoding random bits: a sample


def test_every_byte_value_round_trips_through_the_neural_coder(tiny_ckpt):
    """bytes(range(256)), random bytes, zero runs through the lock-step neural
    coder (1 and 2 streams), bypassing stored mode. Catches a decoder that
    searches the wrong row of the table or mishandles the shorter last stream."""
    model, _ = ac.load_neural(tiny_ckpt, torch.device("cpu"))
    for data in ODD[:4]:
        data = data[:6000]
        lengths = ac.stream_layout(len(data), 2, 4096)
        payloads = ac.neural_encode(model, torch.device("cpu"), data, lengths, 20, 32)
        assert ac.neural_decode(model, torch.device("cpu"), payloads, lengths, 20, 32) == data


def neural_archive(tiny_ckpt, data=TEXT[:9000]):
    blob = ac.compress(data, "neural", ckpt=tiny_ckpt, device="cpu")
    assert ac.unpack_archive(blob)[0]["model"] == "neural"  # not stored: the tiny model compresses
    return blob


def craft(header, body, version=3):
    """An archive with this header and payload, every CRC recomputed (a hostile file)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    head = ac.MAGIC + bytes([version]) + struct.pack(">I", len(text)) + text
    return head + struct.pack(">I", zlib.crc32(head)) + body


def run_cli(capsys, *argv):
    """main(argv) -> (exit code, last line of stderr)."""
    try:
        ac.main(list(map(str, argv)))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=__import__("sys").stderr)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_changed_kernel_fingerprint_is_refused_before_decoding(tiny_ckpt, tmp_path, capsys,
                                                               monkeypatch):
    """A neural archive whose recorded kernel path or probe tables differ from
    this machine's is refused before any byte is decoded, saying what differs.
    Catches a missing or late fingerprint check, and a forced thread count."""
    blob = neural_archive(tiny_ckpt)
    header, payloads = ac.unpack_archive(blob)
    calls = []
    real_decode = ac.neural_decode
    monkeypatch.setattr(ac, "neural_decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("thread count forced"))
    back = tmp_path / "back"
    for key, value in (("kernel", "NO_AVX"), ("probe_sha256", "0" * 32), ("torch", "1.0.0")):
        bad = dict(header, fingerprint=dict(header["fingerprint"], **{key: value}))
        (tmp_path / "bad.ac").write_bytes(craft(bad, b"".join(payloads)))
        code, line = run_cli(capsys, "decompress", tmp_path / "bad.ac", back, "--ckpt", tiny_ckpt,
                             "--device", "cpu")
        assert code == 1 and "cannot be decoded here" in line and value in line and not calls
        assert not back.exists()
    (tmp_path / "good.ac").write_bytes(blob)
    assert run_cli(capsys, "decompress", tmp_path / "good.ac", back, "--ckpt", tiny_ckpt,
                   "--device", "cpu")[0] == 0
    assert back.read_bytes() == TEXT[:9000] and calls


def counting(monkeypatch, cls):
    """Count cls.decode calls; fail the test past 10^6 (an unbounded decode)."""
    seen = {"symbols": 0, "models": []}
    real_decode, real_init = cls.decode, cls.__init__

    def decode(self, dec):
        seen["symbols"] += 1
        if seen["symbols"] > 10 ** 6:
            pytest.fail("decoding ran on past a million symbols")
        return real_decode(self, dec)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        seen["models"].append(self)

    monkeypatch.setattr(cls, "decode", decode)
    monkeypatch.setattr(cls, "__init__", init)
    return seen


@pytest.mark.parametrize("name", ["order0", "context"])
def test_crafted_bomb_is_refused_after_a_bounded_number_of_symbols(name, monkeypatch, capsys, tmp_path):
    """A valid payload whose header claims 10^12 bytes is refused before decoding
    (a payload of n bytes holds at most (8n + 2) / -log2(max P) symbols); one that
    claims a little more than it holds stops once the decoder reads past the end
    of the payload. Counted in symbols and table entries, not seconds. Catches a
    missing length check and a decoder that reads zeros past the end forever."""
    data = TEXT[:2000]
    blob = ac.compress(data, name)
    header, payloads = ac.unpack_archive(blob)
    seen = counting(monkeypatch, ac.Order0Model if name == "order0" else ac.ContextModel)
    for claim, expected in ((10 ** 12, "cannot hold"), (len(data) * 3, "payload ends")):
        seen["symbols"] = 0
        (tmp_path / "bomb.ac").write_bytes(craft(dict(header, length=claim), payloads[0]))
        code, line = run_cli(capsys, "decompress", tmp_path / "bomb.ac", tmp_path / "out")
        assert code == 1 and expected in line, line
        assert seen["symbols"] <= len(data) + 200 and not (tmp_path / "out").exists()
    bound = ac.most_symbols(len(payloads[0]), ac.LEAST_ODDS[name], 32)
    assert len(data) * 3 <= bound < 10 ** 12  # the second claim passed the first check
    if name == "context":  # tables hold at most (order + 1) contexts per decoded symbol
        nodes, pairs, matches = seen["models"][-1].entries()
        assert nodes <= 11 * (len(data) + 200) and matches <= len(data) + 200


def test_max_size_caps_the_output(tmp_path, capsys):
    src, arc = tmp_path / "in", tmp_path / "in.ac"
    src.write_bytes(TEXT[:3000])
    assert run_cli(capsys, "compress", src, arc, "--model", "order0")[0] == 0
    code, line = run_cli(capsys, "decompress", arc, tmp_path / "out", "--max-size", 2999)
    assert code == 1 and "--max-size" in line and not (tmp_path / "out").exists()
    assert run_cli(capsys, "decompress", arc, tmp_path / "out", "--max-size", 3000)[0] == 0


def good_headers(tiny_ckpt, tmp_path):
    order0 = ac.unpack_archive(ac.compress(TEXT[:500], "order0"))
    context = ac.unpack_archive(ac.compress(TEXT[:500], "context"))
    neural = ac.unpack_archive(neural_archive(tiny_ckpt))
    return {"order0": order0, "context": context, "neural": neural}


BAD_HEADERS = [  # (model, change, words of the error line)
    ("order0", {"length": "500"}, "not a int"), ("order0", {"length": 500.0}, "not a int"),
    ("order0", {"length": True}, "not a int"), ("order0", {"length": -1}, "out of range"),
    ("order0", {"state_bits": 8}, "out of range"), ("order0", {"state_bits": "32"}, "not a int"),
    ("order0", {"crc32": -5}, "out of range"), ("order0", {"streams": [1, 2]}, "streams"),
    ("order0", {"streams": ["a"]}, "streams"), ("order0", {"model": "lz77"}, "unknown model"),
    ("order0", {"state_bits": None}, "state_bits"),
    ("context", {"order": -1}, "out of range"), ("context", {"order": None}, "'order'"),
    ("context", {"min_match": 0}, "out of range"), ("context", {"memory_mb": "big"}, "not a int"),
    ("neural", {"k": 40}, "'k'"), ("neural", {"ckpt_sha256": None}, "ckpt_sha256"),
    ("neural", {"chunk": 0}, "out of range"), ("neural", {"chunk": 10}, "streams"),
    ("neural", {"fingerprint": {"a": 1, "b": 2, "c": 3, "d": 4}}, "fingerprint"),
    ("neural", {"fingerprint": "x"}, "fingerprint"), ("neural", {"threads": 0, "k": 2}, "'k'"),
    ("neural", {"length": 10 ** 12, "chunk": 10 ** 12 // 2 + 1}, "header says"),  # a neural bomb
]


def test_every_crafted_header_field_is_refused_in_one_line(tiny_ckpt, tmp_path, capsys):
    """Each field of each model's header with a wrong type or range, a missing
    field, deeply nested JSON: one line, exit 1, no output file, no traceback.
    Catches any field used before it is checked (bool as int, str as int...)."""
    good = good_headers(tiny_ckpt, tmp_path)
    out = tmp_path / "out"
    cases = [(craft(dict(good[m][0], **change), b"".join(good[m][1])), words)
             for m, change, words in BAD_HEADERS]
    cases += [(craft(b"[" * 30000 + b"]" * 30000, b""), "not valid JSON"),
              (craft(b"{\"model\": \"order0\", \"length\": 1" + b"0" * 5000 + b"}", b""), "JSON"),
              (craft(b"[1, 2]", b""), "unknown model"),
              (craft({k: v for k, v in good["order0"][0].items() if k != "crc32"},
                     good["order0"][1][0]), "'crc32'"),
              (ac.MAGIC + b"\x03" + struct.pack(">I", 1 << 30), "more than")]
    for blob, words in cases:
        (tmp_path / "bad.ac").write_bytes(blob)
        code, line = run_cli(capsys, "decompress", tmp_path / "bad.ac", out, "--ckpt", tiny_ckpt,
                             "--device", "cpu")
        assert code == 1 and line.startswith("error:") and words in line, (words, line)
        assert not out.exists()


def test_a_users_tmp_file_is_never_touched_and_failures_leave_nothing(tmp_path, capsys):
    """atomic_write must use a unique temporary name: a user's own OUT.tmp
    survives, and a failed run leaves neither OUT nor a stray temporary file.
    Catches the fixed `OUT.tmp` name of the old atomic_write."""
    src, arc, back = tmp_path / "in", tmp_path / "in.ac", tmp_path / "back"
    src.write_bytes(TEXT[:1000])
    (tmp_path / "in.ac.tmp").write_bytes(b"mine")
    (tmp_path / "back.tmp").write_bytes(b"mine too")
    assert run_cli(capsys, "compress", src, arc)[0] == 0
    assert run_cli(capsys, "decompress", arc, back)[0] == 0 and back.read_bytes() == TEXT[:1000]
    assert (tmp_path / "in.ac.tmp").read_bytes() == b"mine"
    assert (tmp_path / "back.tmp").read_bytes() == b"mine too"
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
        enc_model.encode(enc, x)
        if i % 997 == 0 or i == len(data) - 1:
            nodes, pairs, matches = enc_model.entries()
            assert enc_model.used == (nodes * ac.NODE_BYTES + pairs * ac.PAIR_BYTES
                                      + matches * ac.MATCH_BYTES + len(enc_model.data)) <= 1 << 20
    payload = enc.finish()
    assert enc_model.resets >= 2
    dec_model = ac.ContextModel(memory_mb=1)
    assert ac.decode_with(dec_model, payload, len(data)) == data
    assert dec_model.resets == enc_model.resets and dec_model.used == enc_model.used
    free = ac.ContextModel(memory_mb=0)
    assert ac.encode_with(free, data)[0] != payload and free.resets == 0
    assert free.used > 1 << 20


@pytest.mark.parametrize("name", ["order0", "context"])
def test_incompressible_input_is_stored_within_the_stated_overhead(name, tmp_path):
    """Random bytes would expand under any model: the archive is stored mode,
    at most STORED_OVERHEAD (50) bytes larger, and decodes. Catches a missing
    stored mode or a header that grew."""
    for data in (np.random.default_rng(1).bytes(20000), b"", b"x"):
        blob = ac.compress(data, name)
        assert ac.unpack_archive(blob)[0]["model"] == "stored"
        assert len(blob) - len(data) <= ac.STORED_OVERHEAD == 50
        assert ac.decompress(blob) == data


BAD_FLAGS = [
    (["compress", "a", "b", "--precision", "32"], "--precision is now spelled --state-bits"),
    (["compress", "a", "b", "--precision=32"], "--state-bits"),
    (["compress", "a", "b", "--state-bits", "8"], "--state-bits"),
    (["compress", "a", "b", "--model", "neural", "--k", "40"], "--k"),
    (["compress", "a", "b", "--model", "neural", "--streams", "0"], "--streams"),
    (["compress", "a", "b", "--order", "-1"], "--order"),
    (["compress", "a", "b", "--min-match", "0"], "--min-match"),
    (["compress", "a", "b", "--memory-mb", "-1"], "--memory-mb"),
    (["decompress", "a", "b", "--max-size", "-1"], "--max-size"),
    (["train", "--steps", "0"], "--steps"), (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "nan"], "--lr"), (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--test-limit", "-1"], "--test-limit"), (["train", "--sample-only"], "--ckpt"),
    (["sample", "--model", "context", "--num-samples", "-1"], "--num-samples"),
    (["bench", "--models", "order0,lz"], "--models"), (["bench", "--limit", "0"], "--limit"),
    (["compress", "a", "b", "--model", "zip"], "--model"),
]


@pytest.mark.parametrize("argv,words", BAD_FLAGS)
def test_bad_flags_get_usage_and_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        ac.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].startswith("usage:") and words in err[-1], err[-1]


def test_flags_are_checked_only_for_the_model_that_uses_them():
    """--k only matters to the neural model, --order to the context model:
    `--model order0 --state-bits 20` must not be refused because of --k 24."""
    assert args_for("--model", "order0", "--state-bits", "20").state_bits == 20
    assert args_for("--model", "order0", "--order", "-1").order == -1
    assert args_for("--model", "context", "--k", "99").k == 99
    assert ac.parse_args(["decompress", "a", "b", "--state-bits", "8"]).command == "decompress"


@pytest.mark.parametrize("name", ["order0", "context"])
def test_version_2_archives_still_decode(name, tmp_path, capsys):
    """Archives written by the version-2 script (before these changes) decode
    to their text; other versions are refused naming the versions read."""
    blob = bytes.fromhex("".join(V2_ARCHIVES[name]))
    assert blob[4] == 2
    assert ac.decompress(blob) == (STDLIB / "argparse.py").read_bytes()[:400]
    (tmp_path / "v1.ac").write_bytes(blob[:4] + b"\x01" + blob[5:])
    code, line = run_cli(capsys, "decompress", tmp_path / "v1.ac", tmp_path / "out")
    assert code == 1 and "version 1" in line and "versions 2 and 3" in line


def test_container_failures_are_one_line_errors(tmp_path, capsys, tiny_ckpt):
    src, arc, back = tmp_path / "in.py", tmp_path / "in.ac", tmp_path / "back.py"
    src.write_bytes(TEXT[:2000])
    assert run_cli(capsys, "compress", src, arc, "--model", "order0")[0] == 0
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
        code, line = run_cli(capsys, "decompress", bad, back, "--force")
        assert code == 1 and line.startswith("error:") and expected.strip() in line, (expected, line)
        assert not back.exists()
    # a neural archive without its model, and with the wrong one
    src.write_bytes(TEXT[:9000])  # long enough for the tiny model to beat stored mode
    assert run_cli(capsys, "compress", src, arc, "--model", "neural", "--force",
                   "--ckpt", tiny_ckpt, "--device", "cpu")[0] == 0
    code, line = run_cli(capsys, "decompress", arc, back, "--ckpt", tmp_path / "missing.pt",
                         "--device", "cpu")
    assert code == 1 and "model.pt was not found" in line
    other = tmp_path / "other.pt"
    ac.save_checkpoint(other, ac.ByteGRU(24, 8).state_dict(), {"hidden": 24, "embed": 8})
    code, line = run_cli(capsys, "decompress", arc, back, "--ckpt", other, "--device", "cpu")
    assert code == 1 and "is not the model" in line
    ac.save_checkpoint(other, {}, {"hidden": "24", "embed": 8})  # right script, broken config
    code, line = run_cli(capsys, "compress", src, arc, "--model", "neural", "--force", "--ckpt", other)
    assert code == 1 and "hidden" in line
    ac.save_checkpoint(other, {"x": torch.zeros(1)}, {"hidden": 24, "embed": 8})  # broken weights
    code, line = run_cli(capsys, "compress", src, arc, "--model", "neural", "--force", "--ckpt", other)
    assert code == 1 and "weights do not fit" in line
    code, line = run_cli(capsys, "compress", tmp_path / "nope", arc, "--force")
    assert code == 1 and "cannot read" in line


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


def test_train_smoke_writes_outputs_and_sample_only_reloads(tmp_path, capsys):
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
    (tmp_path / "file").write_bytes(b"")
    code, line = run_cli(capsys, "train", "--out", tmp_path / "file", "--steps", "1",
                         "--data-dir", corpus_dir)
    assert code == 1 and "is a file" in line


def test_bench_smoke_textbook_and_fast_coders_agree(tmp_path):
    src = tmp_path / "x.py"
    src.write_bytes(TEXT[:3000] + bytes(range(256)))
    results = ac.main(["bench", str(src), "--models", "order0,context", "--ref-limit", "2000",
                       "--out", str(tmp_path / "b")])
    assert results[0]["order0_side_by_side"]["same_output"] is True
    assert (tmp_path / "b" / "bench.md").is_file()
    assert all(r["archive_bytes"] < 3256 for r in results[0]["models"])
