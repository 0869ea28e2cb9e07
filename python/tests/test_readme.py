"""The README's Python example runs as written (from the repository root, where its paths point)."""

import os
import re

from conftest import ROOT


def test_the_readme_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[") and out[0].endswith("True")
    assert sorted(line.split()[0] for line in out[1:]) == ["0", "1"]
