"""Every kernel in kernels_cu/ builds with NVRTC for sm_80 and sm_90a, without a GPU."""
from __future__ import annotations

import pytest

import varattn
from varattn.cuda import loader, structs

pytestmark = pytest.mark.skipif(loader.cupy_missing_reason() is not None,
                                reason=str(loader.cupy_missing_reason()))

FAMILIES = sorted(path.stem for path in loader.SOURCE_DIR.glob("*.cu"))


def test_every_kernel_file_has_a_registered_family():
    assert FAMILIES and set(FAMILIES) <= set(loader.FAMILIES), "register the family's instances with the loader"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles(family, arch):
    if family.endswith("_hopper") and arch != "sm_90a":
        pytest.skip("Hopper-only kernels")
    cubin = loader.compile_for_arch(loader.source(family), loader.FAMILIES[family], arch)
    assert len(cubin) > 1000


@pytest.mark.parametrize("mirror", structs.STRUCTS, ids=lambda s: s.name)
def test_host_mirrors_match_the_kernel_structs(mirror):
    """Every struct the kernels take by value has the layout of its host mirror (varattn/cuda/structs.py)."""
    try:
        loader.compile_for_arch(loader.expanded(mirror.source) + mirror.layout_assertions(), [], "sm_80")
    except varattn.KernelCompileError as error:
        if '"__builtin_offsetof" is undefined' in str(error):  # NVRTC 13.0 lacks it; 13.5 (CI) has it
            pytest.skip("this NVRTC has no __builtin_offsetof")
        raise


def test_compile_error_carries_the_log():
    with pytest.raises(varattn.KernelCompileError, match="error"):
        loader.compile_for_arch("this is not CUDA", [], "sm_80")
