"""The README's "use it from Python" example runs verbatim, as a user would paste it."""

import re
import subprocess
import sys

from conftest import ROOT


def test_the_python_example_in_the_readme_runs_verbatim(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # Run from a scratch folder with the repository on the path, so that nothing the
    # example writes lands in the checkout.
    env_code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code
    result = subprocess.run([sys.executable, "-c", env_code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
