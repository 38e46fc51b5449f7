"""Tests of tools/compression_bench.py: it splits the held-out text as arith_coding.py
does, runs the script's compress and decompress, checks the round trip and reports
whole-archive sizes next to zlib, bzip2 and xz."""

import json
import sys
import zlib

import pytest

import arith_coding as ac
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import compression_bench as bench  # noqa: E402


def test_heldout_split_is_the_scripts(tmp_path, capsys):
    """The tool's held-out text is byte for byte what arith_coding.py's corpus() holds
    out (sorted paths, 1 in 20 by CRC32 of the relative path, site-packages skipped)."""
    (tmp_path / "pkg" / "site-packages").mkdir(parents=True)
    (tmp_path / "pkg" / "site-packages" / "x.py").write_bytes(b"skipped\n" * 50)
    held = 0
    for i in range(60):
        (tmp_path / ("pkg" if i % 3 else ".") / f"m{i}.py").write_bytes(f"# file {i}\n".encode() * (i + 1))
        held += zlib.crc32((f"pkg/m{i}.py" if i % 3 else f"m{i}.py").encode()) % 20 == 0
    assert held >= 2
    assert bench.heldout_text(tmp_path) == ac.corpus(tmp_path)[1]


def test_bench_round_trips_through_the_script_and_writes_its_table(tmp_path):
    """A small file through `arith_coding.py compress/decompress` as programs: the row's
    size is the archive file's, bits per byte 8 x size / input, and the baselines are
    the whole zlib, bzip2 and xz outputs."""
    src = tmp_path / "x.py"
    data = (ROOT / "arith_coding.py").read_bytes()[:4000] + bytes(range(256))
    src.write_bytes(data)
    results = bench.main([str(src), "--models", "order0", "--out", str(tmp_path / "b")])
    rows = {r["coder"]: r for r in results[0]["rows"]}
    assert set(rows) == {"order0", "xz -9e", "bzip2 -9", "zlib -9"}
    assert rows["zlib -9"]["bytes"] == len(zlib.compress(data, 9))
    archive = ac.compress(data, "order0")
    assert rows["order0"]["bytes"] == len(archive) < len(data)
    assert rows["order0"]["bits_per_byte"] == round(8 * len(archive) / len(data), 4)
    assert json.loads((tmp_path / "b" / "bench.json").read_text()) == results
    assert "| order0 |" in (tmp_path / "b" / "bench.md").read_text()


def test_bad_models_and_failed_runs_end_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--models", "order0,lz"])
    assert e.value.code == 2 and "--models" in capsys.readouterr().err
    (tmp_path / "x").write_bytes(b"abc" * 100)
    with pytest.raises(SystemExit) as e:
        bench.main([str(tmp_path / "x"), "--script", str(tmp_path / "gone.py"), "--out", str(tmp_path / "b")])
    assert str(e.value.code).startswith("error: gone.py compress failed:") and "\n" not in e.value.code
