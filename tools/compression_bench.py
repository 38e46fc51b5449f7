"""Archive against archive: arith_coding.py's files against zlib, bzip2 and xz.

Runs `python arith_coding.py compress` and `decompress` as separate programs on each
input, so that what is measured is the whole archive (header and checksums included)
and what a user runs; checks that the round trip gives the input back byte for byte;
and prints one table: archive bytes and bits per byte of each model, next to whole
`zlib -9`, `bzip2 -9` and `xz -9e` files (Python's zlib, bz2 and lzma modules).

The default input is the first megabyte of the held-out split of the standard
library's .py files, split as `arith_coding.py train` splits it (sorted paths, 1 file
in 20 held out by a CRC32 of its relative path). The context model's settings were
tuned on that megabyte: `--offset 1000000` measures on the held-out text after it.

    python tools/compression_bench.py                      # the README's table
    python tools/compression_bench.py --offset 1000000     # text the settings never saw
    python tools/compression_bench.py FILE... --models order0,context,neural \\
        --ckpt runs/arith_coding/model.pt

Seconds are wall time of each program, its start-up (importing torch) included.
Writes bench.md and bench.json into --out. Imports no script of this project.
"""
import argparse
import bz2
import json
import lzma
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "arith_coding.py"
MODELS = ("order0", "context", "neural")
BASELINES = {"xz -9e": lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME),
             "bzip2 -9": lambda d: bz2.compress(d, 9), "zlib -9": lambda d: zlib.compress(d, 9)}


def heldout_text(root):
    """The held-out .py text of a folder, in the order arith_coding.py's corpus() joins it:
    site-packages skipped, paths sorted, a file held out when CRC32(relative path) % 20 == 0."""
    root, files = Path(root), []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "site-packages"]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return b"".join(p.read_bytes() for p in sorted(files)
                    if zlib.crc32(p.relative_to(root).as_posix().encode()) % 20 == 0)


def run_script(script, *args):
    """Seconds that `python script args` took; its last line of stderr if it failed."""
    start = time.time()
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        sys.exit(f"error: {Path(script).name} {args[0]} failed: {lines[-1]}")
    return time.time() - start


def bench_one(name, data, models, script, extra, folder):
    """One input: every model's archive through the script and back, then the baselines."""
    src, rows = Path(folder) / "input", []
    src.write_bytes(data)
    for model in models:
        arc, back = Path(folder) / f"{model}.ac", Path(folder) / f"{model}.out"
        print(f"{name}: {model} ...", flush=True)
        enc = run_script(script, "compress", src, arc, "--model", model, "--force", *extra)
        dec = run_script(script, "decompress", arc, back, "--force", *extra)
        if back.read_bytes() != data:
            sys.exit(f"error: {model}: the round trip did not give the input back")
        size = arc.stat().st_size
        stored = arc.read_bytes()[9:9 + 200].find(b'"model":"stored"') >= 0
        rows.append({"coder": model + (" (stored)" if stored else ""), "bytes": size,
                     "bits_per_byte": round(8 * size / max(len(data), 1), 4),
                     "encode_seconds": round(enc, 2), "decode_seconds": round(dec, 2)})
    for tool, pack in BASELINES.items():
        size = len(pack(data))
        rows.append({"coder": tool, "bytes": size, "bits_per_byte": round(8 * size / max(len(data), 1), 4)})
    return {"input": name, "input_bytes": len(data), "rows": rows}


def table(results):
    lines = ["| input | bytes | coder | archive bytes | bits/byte | encode s | decode s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['input']} | {r['input_bytes']:,} | {row['coder']} | {row['bytes']:,} | "
                         f"{row['bits_per_byte']:.3f} | {row.get('encode_seconds', '')} | "
                         f"{row.get('decode_seconds', '')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="arith_coding.py's archives against zlib, bzip2 and xz, "
                                "round trips checked.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="*", help="files to measure (none: held-out stdlib .py text)")
    p.add_argument("--data-dir", default=sysconfig.get_paths()["stdlib"], help="folder of .py files")
    p.add_argument("--offset", type=int, default=0, help="held-out bytes skipped first")
    p.add_argument("--limit", type=int, default=1_000_000, help="held-out bytes measured")
    p.add_argument("--models", default="order0,context", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--ckpt", help="neural: the GRU's model.pt (None: the script's default)")
    p.add_argument("--device", default="cpu", help="neural: the device of the coder")
    p.add_argument("--script", default=str(SCRIPT), help="arith_coding.py to run")
    p.add_argument("--out", default="runs/compression_bench", help="where bench.md and bench.json go")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if not args.models or any(m not in MODELS for m in args.models):
        p.error(f"--models is a comma-separated list of {', '.join(MODELS)}")
    if args.offset < 0 or args.limit < 1:
        p.error("--offset must be >= 0 and --limit >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    extra = ["--device", args.device] + (["--ckpt", args.ckpt] if args.ckpt else [])
    if args.files:
        inputs = [(f, Path(f).read_bytes()) for f in args.files]
    else:
        part = heldout_text(args.data_dir)[args.offset:args.offset + args.limit]
        if not part:
            sys.exit(f"error: no held-out .py text under {args.data_dir} past byte {args.offset}")
        inputs = [(f"held-out .py bytes {args.offset:,} to {args.offset + len(part):,}", part)]
    with tempfile.TemporaryDirectory() as folder:
        results = [bench_one(name, data, args.models, args.script, extra, folder) for name, data in inputs]
    text = table(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
