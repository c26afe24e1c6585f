"""The README's Python API example runs as written, on two tiny local checkpoints in place of the demo's."""

from __future__ import annotations

import re
from pathlib import Path

from helpers.pipeline import save_checkpoint

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_api_example_runs(tmp_path: Path, capsys) -> None:
    text = README.read_text()
    section = text[text.index("## The Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    paths = re.findall(r'"(lakehouse/demo/models/\w+)"', code)
    assert paths == ["lakehouse/demo/models/pretrained", "lakehouse/demo/models/finetuned"], paths
    words = sorted({w for w in re.findall(r"[^\s\"'(),=\[\]]+", code)})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]"] + words)}
    for i, p in enumerate(paths):
        save_checkpoint(tmp_path / p, vocab, seed=i)
        code = code.replace(f'"{p}"', repr(str(tmp_path / p)))
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    table = scope["table"]
    assert set(table.method) == {"ms_if", "ss_if", "gdp"}
    assert len(table) == 3 * 2 and set(table.doc_id) == {"d1", "d2"} and set(table.query_id) == {"q1"}
    assert "ms_if" in capsys.readouterr().out
