"""`python -m varattn info` and `python -m varattn precompile`, without a GPU."""
from __future__ import annotations

import pytest

import varattn.__main__ as varattn_main
from varattn.cli import info, precompile
from varattn.cuda import loader

needs_nvrtc = pytest.mark.skipif(loader.cupy_missing_reason() is not None, reason=str(loader.cupy_missing_reason()))


def test_every_instance_names_its_dtype_then_head_dim():
    """precompile's filters read a kernel's first template argument as its
    storage type and its second as its head dim; plan kernels and plain
    kernels take neither."""
    for family, expressions in loader.FAMILIES.items():
        for expression in expressions:
            arguments = precompile.template_arguments(expression)
            if "_plan" in expression or not arguments:
                assert not arguments or arguments[0].isdigit(), expression
                continue
            assert arguments[0] in precompile.DTYPES.values(), expression
            if len(arguments) > 1:
                assert int(arguments[1]) in (32, 64, 96, 128, 192, 256), expression


def test_filters_keep_what_they_name():
    everything = precompile.instances(["sm_80", "sm_90a"])
    assert {family for family, _, _ in everything} == set(loader.FAMILIES)
    assert not any(f.endswith("_hopper") and arch == "sm_80" for f, _, arch in everything)
    chosen = precompile.instances(["sm_90a"], dtypes=["bfloat16"], head_dims={64}, backends_=["flash"])
    assert chosen and {f for f, _, _ in chosen} <= set(precompile.BACKEND_FAMILIES["flash"])
    for _, expression, _ in chosen:
        arguments = precompile.template_arguments(expression)
        assert expression.startswith("flash_plan<") or (arguments[0] == "bf16_t" and arguments[1:2] in ([], ["64"]))


@needs_nvrtc
def test_precompile_fills_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VARATTN_CACHE_DIR", str(tmp_path))
    args = ["--arch", "sm_80", "--backend", "math", "--dtype", "float32", "--jobs", "2"]
    assert precompile.main(args) == 0
    expected = precompile.instances(["sm_80"], dtypes=["float32"], backends_=["math"])
    assert precompile.cache_size()[0] == len(expected) == len(list(tmp_path.glob("*.cubin")))
    assert f"the cache holds {len(expected)} kernels" in capsys.readouterr().out


def test_precompile_without_a_gpu_asks_for_an_arch(monkeypatch, capsys):
    monkeypatch.setattr(precompile, "_device_archs", lambda: [])
    if loader.cupy_missing_reason() is None:
        assert precompile.main([]) == 2
        assert "--arch" in capsys.readouterr().err


def test_info_reports_versions_cache_and_backends(tmp_path, monkeypatch):
    monkeypatch.setenv("VARATTN_CACHE_DIR", str(tmp_path))
    text = info.report()
    for expected in ("varattn ", "torch ", "cupy", f"kernel cache {tmp_path}: 0 kernels", "cpu, float32",
                     "backend: math", "flash: runs on cuda"):
        assert expected in text, (expected, text)


def test_python_m_varattn_dispatches_each_command(capsys):
    """`python -m varattn <command>` (tests/test_packaging.py runs `info` so, from the wheel)."""
    assert varattn_main.main(["info"]) == 0 and "kernel cache" in capsys.readouterr().out
    assert varattn_main.main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("demo", "info", "precompile"))
    with pytest.raises(SystemExit) as done:
        varattn_main.main(["precompile", "--help"])
    assert done.value.code == 0 and "--head-dim" in capsys.readouterr().out
    assert varattn_main.main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
