"""README.md as a new user meets it: its python blocks run as written, its
CPU test command is what CI runs, the demo is quiet, and it refers to nothing
outside the repository.

The blocks build on each other (the quick start's q, k, v and x), so each
block runs after the CPU blocks above it, in one fresh namespace, as a reader
pasting them in order into one session would. A block whose first line is
`# needs a CUDA GPU` is marked gpu (skipped without CUDA, see conftest.py);
later blocks must not need it, so that they run the same on either machine.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GPU_MARK = "# needs a CUDA GPU"


def python_blocks():
    """(line of the block's first code line, code) for each ```python block."""
    return [(README.count("\n", 0, match.start(1)) + 1, match.group(1))
            for match in re.finditer(r"^```python\n(.*?)^```", README, re.M | re.S)]


BLOCKS = python_blocks()


def needs_gpu(code: str) -> bool:
    return code.startswith(GPU_MARK + "\n")


def run_block(line: int, code: str, namespace: dict) -> None:
    # Blank lines in front so that a traceback gives the README's line numbers.
    exec(compile("\n" * (line - 1) + code, "README.md", "exec"), namespace)


@pytest.mark.parametrize("index", [
    pytest.param(i, id=f"README.md:{line}", marks=[pytest.mark.gpu] if needs_gpu(code) else [])
    for i, (line, code) in enumerate(BLOCKS)])
def test_block_runs(index):
    namespace = {"__name__": "readme"}
    for line, code in BLOCKS[:index]:
        if not needs_gpu(code):
            run_block(line, code, namespace)
    run_block(*BLOCKS[index], namespace)


def test_blocks_found():
    assert len(BLOCKS) >= 7
    assert any(needs_gpu(code) for _, code in BLOCKS)  # the gpu marking is exercised


def test_ci_runs_the_readme_cpu_test_command():
    commands = [line.strip() for line in README.splitlines()
                if line.startswith("    pip install torch --index-url") and "python -m pytest" in line]
    assert len(commands) == 1, commands
    assert commands[0] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_refers_to_nothing_outside_the_repository():
    assert "../" not in README


def test_demo_is_quiet():
    done = subprocess.run([sys.executable, "-m", "varattn"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # torch's NestedTensor prototype warning filtered
    assert "varattn.attention(q, k, v)" in done.stdout
    assert "torch.nn.functional.scaled_dot_product_attention(q, k, v)" in done.stdout
