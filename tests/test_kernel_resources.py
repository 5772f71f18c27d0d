"""The resource tables at the top of the flash kernel files are what ptxas
reports for the code as it is (tools/kernel_resources.py writes them)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from varattn.cuda import loader

pytestmark = pytest.mark.skipif(loader.cupy_missing_reason() is not None,
                                reason=str(loader.cupy_missing_reason()))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import kernel_resources  # noqa: E402


def test_tables_match_the_kernels():
    version = "%d.%d" % loader.nvrtc_version()
    for family in kernel_resources.TABLES:
        path = loader.SOURCE_DIR / f"{family}.cu"
        made_by = re.search(r"// resources: NVRTC (\d+\.\d+)", path.read_text())
        assert made_by, f"{path.name} has no resource table"
        if made_by.group(1) != version:
            pytest.skip(f"{path.name}'s table is NVRTC {made_by.group(1)}'s; this is NVRTC {version}")
    assert kernel_resources.main(["--check"]) == 0, "run python tools/kernel_resources.py"
