"""The blocks every script repeats stay byte-identical.

A block is fenced as `# --- shared: <name> ---` ... `# --- end shared ---`. Every
script that carries a block of a given name carries exactly the text of
autoencoder.py's block of that name, unless its fence says why it deviates:
`# --- shared: <name> (deviates: <why>) ---`.
"""

import ast
import re
import sys

import pytest

from conftest import ROOT, SCRIPTS

FENCE = re.compile(r"^# --- shared: (?P<name>[^()\n]+?)(?: \(deviates: (?P<why>[^)]+)\))? ---$")
END = "# --- end shared ---"


def shared_blocks(text, filename="<text>"):
    """{name: (body, why)} for every fenced block; malformed fences raise ValueError."""
    blocks, name, why, body = {}, None, None, []
    for lineno, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if name is not None:
                raise ValueError(f"{filename}:{lineno}: block {name!r} opened inside block {name!r}")
            name, why, body = m["name"], m["why"], []
        elif line == END:
            if name is None:
                raise ValueError(f"{filename}:{lineno}: end of a block that was never opened")
            if name in blocks:
                raise ValueError(f"{filename}:{lineno}: block {name!r} appears twice")
            blocks[name] = ("\n".join(body), why)
            name = None
        elif line.startswith("# --- shared") or line.startswith("# --- end"):
            raise ValueError(f"{filename}:{lineno}: malformed fence {line!r}")
        elif name is not None:
            body.append(line)
    if name is not None:
        raise ValueError(f"{filename}: block {name!r} is never closed")
    return blocks


def present_scripts():
    return [s for s in SCRIPTS if (ROOT / f"{s}.py").exists()]


TEMPLATE = shared_blocks((ROOT / "autoencoder.py").read_text(), "autoencoder.py")


def test_template_has_the_blocks_every_script_repeats():
    assert {"run utilities", "mnist loader", "png writer"} <= set(TEMPLATE)
    assert all(why is None for _, why in TEMPLATE.values())


@pytest.mark.parametrize("script", present_scripts())
def test_shared_blocks_are_identical_to_the_template(script):
    blocks = shared_blocks((ROOT / f"{script}.py").read_text(), f"{script}.py")
    for name, (body, why) in blocks.items():
        assert name in TEMPLATE, f"{script}.py: block {name!r} has no original in autoencoder.py"
        if why is None:
            assert body == TEMPLATE[name][0], (
                f"{script}.py: shared block {name!r} differs from autoencoder.py's; copy it "
                f"again, or mark the fence '(deviates: <why>)'")
        else:
            assert why.strip(), f"{script}.py: block {name!r} deviates without saying why"


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
    assert shared_blocks(good) == {"png writer": ("x = 1", None)}
    assert shared_blocks(good.replace("x = 1", "x = 2"))["png writer"][0] != "x = 1"
    deviating = good.replace("png writer ---", "png writer (deviates: RGB only) ---")
    assert shared_blocks(deviating)["png writer"][1] == "RGB only"
    for bad in (good.replace("# --- end shared ---\n", ""),
                good.replace("x = 1", "# --- shared: other ---"),
                "# --- end shared ---\n",
                "# --- shared: nameless\n"):
        with pytest.raises(ValueError):
            shared_blocks(bad)
