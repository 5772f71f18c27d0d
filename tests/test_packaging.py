"""The wheel `python -m build` makes: it carries the kernels and the license,
and installed into a fresh virtual environment on the CPU it runs
`python -m varattn info` and a small call."""
from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SMALL_CALL = """
import torch, varattn
q, k, v = (torch.randn(7, 2, 16) for _ in range(3))
cu = torch.tensor([0, 3, 7], dtype=torch.int32)
out = varattn.varlen_attention(q, k, v, cu, cu, 4, 4, causal=True)
expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
    q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True).transpose(0, 1)
    for a, b in ((0, 3), (3, 7))])
assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()
print(varattn.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # from the files git knows, copied: a build in the checkout would leave build/ there, whose stale
    # copies a later build could pack
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # --no-isolation: the installed setuptools builds it, nothing is downloaded
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)],
                   check=True, capture_output=True, text=True)
    (found,) = out.glob("varattn-*.whl")
    return found


def test_wheel_carries_the_kernels_and_the_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(path.name for path in (ROOT / "kernels_cu").iterdir() if path.suffix in (".cu", ".cuh"))
    assert kernels and sorted(n.split("/")[-1] for n in names if n.startswith("varattn/kernels_cu/")
                              and n.endswith((".cu", ".cuh"))) == kernels
    assert any(n.endswith("licenses/LICENSE") for n in names), names
    for package in ("varattn/cli/info.py", "varattn/integrations/transformers.py", "varattn/__main__.py"):
        assert package in names


def test_wheel_runs_in_a_fresh_environment(wheel, tmp_path):
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True)
    # torch (and what it needs) from this environment, appended after the fresh one's own packages;
    # a plain path line runs none of this environment's .pth files, so its editable varattn stays out
    (site / "from_test_environment.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")
    run = dict(check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    info = subprocess.run([str(python), "-m", "varattn", "info"], **run)
    assert "varattn " in info.stdout and "backend: math" in info.stdout, info.stdout
    called = subprocess.run([str(python), "-c", SMALL_CALL], **run)
    assert Path(called.stdout.strip()).is_relative_to(fresh), called.stdout
