"""The README's REPL walkthrough runs as written.

The code is read from README.md's section "## Probing from the REPL". Its python blocks run in order in one namespace, from a folder
whose `runs/` holds the session's small `modadd_quick` and `a_and_b` runs (standing in for the
`lab train` lines, which would take minutes); the `lab analyze` lines run through the CLI, and
every `lab ...` line must parse.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from runs_for_tests import a_and_b_run, grokked_run  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Probing from the REPL"


def walkthrough_text() -> str:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1]
    return SECTION + re.split(r"\n## ", section, maxsplit=1)[0]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_walkthrough_has_code():
    text = walkthrough_text()
    assert len(blocks(text, "python")) >= 4 and blocks(text, "bash")


def test_readme_repl_walkthrough_runs_as_written(grokked_run, a_and_b_run, monkeypatch):
    from lab.cli import build_parser, main

    assert grokked_run.path.parent == a_and_b_run.path.parent
    monkeypatch.chdir(grokked_run.path.parent.parent)
    monkeypatch.delenv("LAB_RUNS_DIR", raising=False)
    text = walkthrough_text()

    for block in blocks(text, "bash"):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if not command:
                continue
            argv = shlex.split(command)
            assert argv[0] == "lab", command
            build_parser().parse_args(argv[1:])  # every line is a valid command
            if argv[1] == "analyze":
                assert main(argv[1:]) == 0, command

    namespace: dict = {"__name__": "__readme__"}
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        for number, block in enumerate(blocks(text, "python"), 1):
            try:
                exec(compile(block, f"<README python block {number}>", "exec"), namespace)
            except Exception as err:  # name the block that broke
                pytest.fail(f"README python block {number} failed: {type(err).__name__}: {err}\n{block}")
    printed = output.getvalue()
    assert "Prediction(label='17'" in printed and "L0H3" in printed  # what the comments promise
    assert namespace["att"].prediction == "17" and namespace["pm"]["restricted_loss"].notna().all()
