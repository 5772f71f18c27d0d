"""Every kernel in kernels_cu/ builds with NVRTC for sm_80 and sm_90a, without a GPU.

By default each family builds, for the architecture it is written for
(sm_80, or sm_90a for the _hopper families), a covering set of its
instances: every kernel template, and every value of each template argument,
at least once (a third of the instances, most of which differ only in the
combination of values); for the other architecture, one instance of each
kernel template (the architecture decides which code paths compile, not the
template values). VARATTN_COMPILE_ALL=1 builds every instance for both, as
the device run does before a kernel change is resolved. Either way the
instances are split over the machine's cores, one NVRTC program per process.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re

import pytest

import varattn
from varattn.cuda import loader, structs

pytestmark = pytest.mark.skipif(loader.cupy_missing_reason() is not None,
                                reason=str(loader.cupy_missing_reason()))

FAMILIES = sorted(path.stem for path in loader.SOURCE_DIR.glob("*.cu"))
COMPILE_ALL = os.environ.get("VARATTN_COMPILE_ALL") == "1"


def covering_set(name_expressions) -> list[str]:
    """Instances among `name_expressions` ("kernel<a, b, ...>", or a plain
    kernel's name) that take every kernel and every value of each of its
    template arguments at least once, chosen greedily (each time the
    instance covering most of what is left)."""
    def features(expression):
        kernel, arguments = re.fullmatch(r"(\w+)(?:<(.*)>)?", expression).groups()
        return {(kernel,)} | {(kernel, i, a.strip()) for i, a in enumerate((arguments or "").split(",")) if a}

    left = {e: features(e) for e in name_expressions}
    needed = set().union(*left.values())
    chosen = []
    while needed:
        best = max(left, key=lambda e: len(left[e] & needed))
        chosen.append(best)
        needed -= left.pop(best)
    return chosen


def chosen_instances(family: str, arch: str) -> list[str]:
    everything = list(loader.FAMILIES[family])
    if COMPILE_ALL:
        return everything
    covering = covering_set(everything)
    if arch == ("sm_90a" if family.endswith("_hopper") else "sm_80"):
        return covering
    first_of_each = {}
    for expression in covering:
        first_of_each.setdefault(expression.split("<")[0], expression)
    return list(first_of_each.values())


def _compile_chunk(family: str, name_expressions: list[str], arch: str) -> int:
    return len(loader.compile_for_arch(loader.source(family), name_expressions, arch).image)


@pytest.fixture(scope="module")
def pool():
    # spawn: the workers need no state of this process, and forking one that
    # runs torch's threads can hang
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(),
                                                mp_context=multiprocessing.get_context("spawn")) as executor:
        yield executor


def test_covering_set_takes_every_value():
    instances = ["k<a, 1>", "k<a, 2>", "k<b, 1>", "k<b, 2>", "plan<3>"]
    chosen = covering_set(instances)
    assert len(chosen) == 3 and "plan<3>" in chosen
    assert {e[2] for e in chosen if e.startswith("k")} == {"a", "b"}
    assert {e[5] for e in chosen if e.startswith("k")} == {"1", "2"}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_every_kernel_template_is_built_for_each_arch(arch):
    for family, everything in loader.FAMILIES.items():
        kernels = {expression.split("<")[0] for expression in everything}
        assert {expression.split("<")[0] for expression in chosen_instances(family, arch)} == kernels, family


def test_every_kernel_file_has_a_registered_family():
    assert FAMILIES and set(FAMILIES) <= set(loader.FAMILIES), "register the family's instances with the loader"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles(pool, family, arch):
    if family.endswith("_hopper") and arch != "sm_90a":
        pytest.skip("Hopper-only kernels")
    instances = chosen_instances(family, arch)
    chunks = [instances[i::os.cpu_count()] for i in range(min(os.cpu_count(), len(instances)))]
    sizes = pool.map(_compile_chunk, [family] * len(chunks), chunks, [arch] * len(chunks))
    assert all(size > 1000 for size in sizes)


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


def test_cache_keeps_each_instance_per_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("VARATTN_CACHE_DIR", str(tmp_path))
    instance = loader.FAMILIES["math"][0]
    image, lowered = loader.cached_cubin("math", instance, "sm_80")
    assert len(list(tmp_path.iterdir())) == 1
    assert len(image) > 1000 and lowered.startswith("_Z")

    def no_compiler(*args):
        raise AssertionError("compiled again")
    with monkeypatch.context() as patched:
        patched.setattr(loader, "compile_for_arch", no_compiler)
        assert loader.cached_cubin("math", instance, "sm_80") == (image, lowered)
        with pytest.raises(AssertionError, match="compiled again"):
            loader.cached_cubin("math", instance, "sm_90a")
