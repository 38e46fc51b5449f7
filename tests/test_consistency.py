"""The blocks every script repeats stay byte-identical, and sit where a reader expects them.

A block is fenced as `# --- shared: <name> ---` ... `# --- end shared ---`. Every copy of a
block must equal every other copy, whichever file holds the first one. A copy that must
differ says why in its fence, `# --- shared: <name> (deviates: <why>) ---`, and wraps the
lines that differ in `# >>> deviates` ... `# <<< deviates`: everything outside those markers
must still match the plain copy, in order (each marked region stands for zero or more of the
plain copy's lines).
"""

import ast
import re
import sys

import pytest

from conftest import ROOT, SCRIPTS

FENCE = re.compile(r"^# --- shared: (?P<name>[^()\n]+?)(?: \(deviates: (?P<why>[^)]+)\))? ---$")
END = "# --- end shared ---"
DEV_START, DEV_END = "# >>> deviates", "# <<< deviates"

IMAGE_SCRIPTS = ["autoencoder", "vae", "pixelcnn", "vqvae", "vqgan", "lfq"]
# Which scripts carry which block: a copy that silently disappears fails too.
CARRIERS = {
    "run utilities": SCRIPTS,
    "image data": IMAGE_SCRIPTS,
    "png writer": IMAGE_SCRIPTS + ["wavenet"],
    "token prior": ["vqvae", "vqgan", "lfq"],
    "arithmetic coder": ["arith_coding", "pixelcnn"],
}
# Blocks that are the method itself stay above the appendix; the rest is plumbing below it.
METHOD_BLOCKS = {"token prior", "arithmetic coder"}
# Each file's size (wc -l, docstring and comments included): a reference is read whole.
MAX_LINES = {"autoencoder": 420, "vae": 500, "pixelcnn": 880, "wavenet": 850, "vqvae": 700,
             "vqgan": 720, "lfq": 780, "arith_coding": 1050}


def shared_blocks(text, filename="<text>"):
    """{name: (body, why, first line number)} for every fenced block; malformed fences raise."""
    blocks, name, why, body, start = {}, None, None, [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if name is not None:
                raise ValueError(f"{filename}:{lineno}: block {m['name']!r} opened inside block {name!r}")
            name, why, body, start = m["name"], m["why"], [], lineno
        elif line == END:
            if name is None:
                raise ValueError(f"{filename}:{lineno}: end of a block that was never opened")
            if name in blocks:
                raise ValueError(f"{filename}:{lineno}: block {name!r} appears twice")
            blocks[name] = ("\n".join(body), why, start)
            name = None
        elif line.startswith("# --- shared") or line.startswith("# --- end"):
            raise ValueError(f"{filename}:{lineno}: malformed fence {line!r}")
        elif name is not None:
            body.append(line)
    if name is not None:
        raise ValueError(f"{filename}: block {name!r} is never closed")
    return blocks


def deviation_pattern(body):
    """A regex matching the plain copy that a deviating `body` was made from: its unmarked
    lines literally, each marked region as any run of whole lines."""
    parts, inside, chunk = [], False, []
    for line in body.splitlines():
        if line.strip() == DEV_START:
            if inside:
                raise ValueError("deviation opened twice")
            parts.append(("text", chunk)); chunk, inside = [], True
        elif line.strip() == DEV_END:
            if not inside:
                raise ValueError("deviation closed but never opened")
            parts.append(("any", None)); inside = False
        elif not inside:
            chunk.append(line)
    if inside:
        raise ValueError("deviation never closed")
    parts.append(("text", chunk))
    regex = ""
    for kind, lines in parts:
        regex += "(?:.*\n)*?" if kind == "any" else "".join(re.escape(l) + "\n" for l in lines)
    return re.compile(regex)


def matches(plain, deviating):
    return deviation_pattern(deviating).fullmatch(plain + "\n") is not None


def present_scripts():
    return [s for s in SCRIPTS if (ROOT / f"{s}.py").exists()]


def all_blocks():
    return {s: shared_blocks((ROOT / f"{s}.py").read_text(), f"{s}.py") for s in present_scripts()}


@pytest.mark.parametrize("name", sorted(CARRIERS))
def test_every_copy_of_a_block_is_identical(name):
    copies = {s: b[name] for s, b in all_blocks().items() if name in b}
    missing = sorted(set(CARRIERS[name]) & set(present_scripts()) - set(copies))
    assert not missing, f"block {name!r} is missing from {missing}"
    plain = {s: body for s, (body, why, _) in copies.items() if why is None}
    assert plain, f"block {name!r} has no plain copy to compare the deviating ones with"
    first, reference = next(iter(plain.items()))
    for script, body in plain.items():
        assert body == reference, (f"{script}.py: block {name!r} differs from {first}.py's; "
                                   "copy it again, or mark the fence '(deviates: <why>)'")
    for script, (body, why, _) in copies.items():
        if why is not None:
            assert why.strip(), f"{script}.py: block {name!r} deviates without saying why"
            assert DEV_START in body, f"{script}.py: block {name!r} deviates but marks no lines"
            assert matches(reference, body), (
                f"{script}.py: block {name!r} differs from {first}.py's outside its "
                "'# >>> deviates' ... '# <<< deviates' regions")


def test_every_block_name_is_known():
    for script, blocks in all_blocks().items():
        for name in blocks:
            assert name in CARRIERS and script in CARRIERS[name], (
                f"{script}.py carries block {name!r}; add it to CARRIERS in this test")


@pytest.mark.parametrize("script", present_scripts())
def test_method_first_plumbing_in_the_appendix(script):
    """Docstring, imports, method, experiment, main; then one 'appendix' banner with the
    plumbing blocks below it; the method's own blocks above it (CONVENTIONS.md)."""
    text = (ROOT / f"{script}.py").read_text()
    lines = text.splitlines()
    banners = [i for i, l in enumerate(lines, 1) if l.startswith("#") and "appendix" in l.lower()]
    assert len(banners) == 1, f"{script}.py: expected one 'appendix' banner, found {len(banners)}"
    appendix = banners[0]
    main_def = next(i for i, l in enumerate(lines, 1) if l.startswith("def main("))
    assert main_def < appendix, f"{script}.py: main() should come before the appendix"
    for name, (_, _, start) in shared_blocks(text, script).items():
        if name in METHOD_BLOCKS:
            assert start < appendix, f"{script}.py: {name!r} is the method; keep it above the appendix"
        else:
            assert start > appendix, f"{script}.py: {name!r} is plumbing; move it below the appendix"
    assert lines[-2:] == ['if __name__ == "__main__":', "    main()"], (
        f"{script}.py: should end with the __main__ guard")
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc.splitlines()) <= 40, f"{script}.py: module docstring over ~35 lines"


@pytest.mark.parametrize("script", present_scripts())
def test_each_file_within_its_size(script):
    lines = (ROOT / f"{script}.py").read_text().count("\n")
    assert lines <= MAX_LINES[script], f"{script}.py: {lines} lines, at most {MAX_LINES[script]}"


@pytest.mark.parametrize("script", present_scripts())
def test_scripts_import_only_stdlib_numpy_torch(script):
    allowed = set(sys.stdlib_module_names) | {"numpy", "torch"}
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{script}.py uses a relative import"
            names = [node.module.split(".")[0]]
        else:
            continue
        for n in names:
            assert n in allowed and n not in SCRIPTS, f"{script}.py imports {n}"


def test_the_checker_notices_drift_and_bad_fences():
    """The check itself can fail: a changed line, an unclosed block, a nested one."""
    good = "# --- shared: png writer ---\nx = 1\n# --- end shared ---\n"
    assert shared_blocks(good)["png writer"][:2] == ("x = 1", None)
    assert shared_blocks(good.replace("x = 1", "x = 2"))["png writer"][0] != "x = 1"
    deviating = good.replace("png writer ---", "png writer (deviates: RGB only) ---")
    assert shared_blocks(deviating)["png writer"][1] == "RGB only"
    for bad in (good.replace("# --- end shared ---\n", ""),
                good.replace("x = 1", "# --- shared: other ---"),
                "# --- end shared ---\n",
                "# --- shared: nameless\n",
                good + good):
        with pytest.raises(ValueError):
            shared_blocks(bad)


def test_a_deviating_copy_is_still_compared_outside_its_markers():
    """Deviation markers excuse only the lines they wrap: a change elsewhere is caught."""
    plain = "a = 1\nb = 2\nc = 3\nd = 4"
    assert matches(plain, f"a = 1\n{DEV_START}\nb = 20\nb2 = 21\n{DEV_END}\nc = 3\nd = 4")
    assert matches(plain, f"a = 1\nb = 2\n{DEV_START}\nextra = 0\n{DEV_END}\nc = 3\nd = 4")
    assert matches(plain, f"{DEV_START}\n{DEV_END}\nd = 4") is True
    assert not matches(plain, f"a = 1\n{DEV_START}\nb = 20\n{DEV_END}\nc = 30\nd = 4")
    assert not matches(plain, f"a = 1\n{DEV_START}\nb = 20\n{DEV_END}\nd = 4\nc = 3")
    assert not matches(plain, "a = 1\nb = 2\nc = 3\nd = 5")
    with pytest.raises(ValueError):
        deviation_pattern(f"a = 1\n{DEV_START}\nb = 2")
