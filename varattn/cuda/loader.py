"""Compile the CUDA kernels of kernels_cu/ and launch them: the only module that touches CuPy.

Each kernel family is one `.cu` file; its template instances are compiled on
first use, one module per instance and device, by NVRTC for that device's
architecture (`sm_90a` on Hopper, so its own instructions are available).
The cubins are kept on disk (`cache_dir()`), keyed by the source with its
local `#include "x.cuh"` lines inlined, the instance, the architecture, the
options and NVRTC's version, so a second process starts fast and
`python -m varattn precompile` can fill the cache on a machine without a GPU.
Launches go through the driver to `torch.cuda.current_stream()` of the
tensors' device.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("varattn")

_HERE = Path(__file__).resolve().parent
# Installed: varattn/kernels_cu; from a source checkout: ../kernels_cu.
SOURCE_DIR = next((d for d in (_HERE.parent / "kernels_cu", _HERE.parent.parent / "kernels_cu") if d.is_dir()),
                  _HERE.parent / "kernels_cu")
_INCLUDE = re.compile(r'^[ \t]*#include\s+"([^"]+)"[ \t]*$', re.MULTILINE)

# family -> the name expressions of every instance a backend may ask for
FAMILIES: dict[str, tuple[str, ...]] = {}

# (family, name expression, device index) -> Kernel. Filled under _compiling's
# lock for that key, so that threads asking for one kernel at once compile it
# once, while other kernels compile beside it.
_kernels: dict = {}
_compiling: dict = {}
_compiling_lock = threading.Lock()


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel; the message carries the compiler's log."""


def register_family(family: str, name_expressions) -> None:
    """Declare the template instances of kernels_cu/<family>.cu (for tests and tools)."""
    FAMILIES[family] = tuple(name_expressions)


@functools.lru_cache(maxsize=None)
def cupy_missing_reason() -> str | None:
    """None when CuPy and NVRTC are usable, else why not (for a backend's reasons)."""
    try:
        import cupy  # noqa: F401
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as error:  # ImportError, or NVRTC's shared library not found
        return (f"CuPy with NVRTC is needed for CUDA tensors ({type(error).__name__}: {error}); "
                "install varattn[cuda12] or varattn[cuda13]")
    return None


def _cupy():
    reason = cupy_missing_reason()
    if reason:
        raise RuntimeError(reason)
    import cupy
    return cupy


def nvrtc_version() -> tuple[int, int]:
    _cupy()
    from cupy_backends.cuda.libs import nvrtc
    return nvrtc.getVersion()


@functools.lru_cache(maxsize=None)
def source(family: str) -> str:
    """kernels_cu/<family>.cu with its local includes inlined."""
    return expanded(f"{family}.cu")


def expanded(file_name: str) -> str:
    """kernels_cu/<file_name> with its local includes inlined, each header once."""
    seen: set[str] = set()

    def expand(path: Path) -> str:
        def include(match):
            name = match.group(1)
            if name in seen:
                return ""
            seen.add(name)
            return expand(SOURCE_DIR / name)
        return _INCLUDE.sub(include, path.read_text())

    return expand(SOURCE_DIR / file_name)


def arch_of(device: torch.device) -> str:
    major, minor = compute_capability(device.index)
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


@functools.lru_cache(maxsize=None)
def compute_capability(index: int | None) -> tuple[int, int]:
    """Of CUDA device `index` (None: the current one, as torch reads it); asked once, as torch asks the driver."""
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def multiprocessors(index: int | None) -> int:
    """The SM count of CUDA device `index`, which sizes persistent grids; asked once."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(index: int | None) -> int:
    """The most shared memory, in bytes, one block of CUDA device `index` may
    opt in to (`kernel()` opts in for what a kernel asks); asked once."""
    optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    if optin is None:  # older torch does not report it: ask the runtime
        runtime = _cupy().cuda.runtime
        optin = runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                           torch.cuda.current_device() if index is None else index)
    return int(optin)


def compile_options(arch: str) -> tuple[str, ...]:
    # -ftz=true: denormals flushed to zero, as CuPy compiles (the kernels were tuned so)
    return ("-std=c++17", f"-arch={arch}", "-ftz=true")


@dataclass(frozen=True)
class Cubin:
    """What NVRTC made of a program: the image, the mangled name of each name
    expression, and the compiler's log."""
    image: bytes
    lowered: dict
    log: str = ""


def compile_for_arch(code: str, name_expressions, arch: str, extra_options: tuple[str, ...] = ()) -> Cubin:
    """NVRTC without a device (it needs none when the architecture is given);
    extra_options: for tools (e.g. -Xptxas=-v, whose report is in the log)."""
    _cupy()
    from cupy_backends.cuda.libs import nvrtc
    program = nvrtc.createProgram(code, "varattn.cu", [], [])
    try:
        for expression in name_expressions:
            nvrtc.addNameExpression(program, expression)
        try:
            nvrtc.compileProgram(program, [*compile_options(arch), *extra_options])
        except nvrtc.NVRTCError as error:
            raise KernelCompileError(
                f"NVRTC failed for {arch}: {error}\n{nvrtc.getProgramLog(program)}") from None
        return Cubin(nvrtc.getCUBIN(program), {e: nvrtc.getLoweredName(program, e) for e in name_expressions},
                     nvrtc.getProgramLog(program))
    finally:
        nvrtc.destroyProgram(program)


def cache_dir() -> Path:
    """Where compiled kernels are kept: $VARATTN_CACHE_DIR, else varattn/kernels
    under $XDG_CACHE_HOME (by default ~/.cache)."""
    if os.environ.get("VARATTN_CACHE_DIR"):
        return Path(os.environ["VARATTN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "varattn" / "kernels"


def cached_cubin(family: str, name_expression: str, arch: str) -> tuple[bytes, str]:
    """(cubin, mangled name) of one instance of kernels_cu/<family>.cu for
    `arch`: read from cache_dir(), or compiled and written there (the file
    replaced whole, so processes filling the cache at once never see a part)."""
    code = source(family)
    key = "\0".join((code, name_expression, arch, *compile_options(arch), repr(nvrtc_version())))
    path = cache_dir() / (hashlib.sha256(key.encode()).hexdigest() + ".cubin")
    try:
        lowered, image = path.read_bytes().split(b"\n", 1)
        return image, lowered.decode()
    except FileNotFoundError:
        pass
    compiled = compile_for_arch(code, [name_expression], arch)
    lowered = compiled.lowered[name_expression]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        partial.write_bytes(lowered.encode() + b"\n" + compiled.image)
        os.replace(partial, path)
    except OSError as error:  # a read-only home, say: the kernel still runs, compiled in each process
        log.warning("varattn: cannot keep compiled kernels in %s: %s", path.parent, error)
    return compiled.image, lowered


@dataclass(frozen=True)
class Kernel:
    """A compiled kernel instance, loaded on one device."""
    name: str
    function: int       # CUfunction
    device_index: int
    module: object = field(default=None, repr=False, compare=False)  # CuPy's Module and Function that own it


def kernel(family: str, name_expression: str, device: torch.device, dynamic_shared_mem: int = 0) -> Kernel:
    """The compiled instance `name_expression` of kernels_cu/<family>.cu for `device`,
    allowed `dynamic_shared_mem` bytes of dynamic shared memory (above 48 KB needs opting in).
    Safe to call from several threads: each kernel is compiled once."""
    key = (family, name_expression, device.index)
    found = _kernels.get(key)
    if found is not None:
        return found
    with _compiling_lock:
        lock = _compiling.setdefault(key, threading.Lock())
    with lock:
        found = _kernels.get(key)
        if found is None:
            found = _kernels[key] = _compile(family, name_expression, device, dynamic_shared_mem)
    return found


def _compile(family: str, name_expression: str, device: torch.device, dynamic_shared_mem: int) -> Kernel:
    cupy = _cupy()
    arch = arch_of(device)
    started = time.perf_counter()
    try:
        image, lowered = cached_cubin(family, name_expression, arch)
    except KernelCompileError as error:
        raise KernelCompileError(f"compiling {name_expression} from kernels_cu/{family}.cu failed: {error}") from None
    with cupy.cuda.Device(device.index):
        module = cupy.cuda.function.Module()
        module.load(image)
        function = module.get_function(lowered)
        if dynamic_shared_mem > 48 * 1024:
            cupy.cuda.driver.funcSetAttribute(
                function.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic_shared_mem)
    found = Kernel(name_expression, function.ptr, device.index, (module, function))
    log.info("varattn: %s (kernels_cu/%s.cu) ready for %s in %.2f s",
             name_expression, family, arch, time.perf_counter() - started)
    return found


class Args:
    """A kernel's arguments, each given as the bytes of its parameter (struct
    layouts, `pointer()`, `int64()`), kept alive for any number of launches."""

    __slots__ = ("_buffer", "pointers")

    def __init__(self, *values: bytes):
        joined = b"".join(values)
        self._buffer = ctypes.create_string_buffer(joined, len(joined))
        at, addresses = ctypes.addressof(self._buffer), []
        for value in values:
            addresses.append(at)
            at += len(value)
        self.pointers = _POINTER_ARRAYS[len(values)](*addresses)


# ctypes array types by length: making one per call costs a microsecond.
_POINTER_ARRAYS = [ctypes.c_void_p * n for n in range(16)]


def pointer(t: torch.Tensor, byte_offset: int = 0) -> bytes:
    return _U64.pack(t.data_ptr() + byte_offset)


def int64(x: int) -> bytes:
    return _I64.pack(x)


_U64, _I64 = struct.Struct("<Q"), struct.Struct("<q")
_thread = threading.local()


def current_stream(kernel_: Kernel) -> int:
    """The raw handle of torch's current stream on the kernel's device."""
    return torch._C._cuda_getCurrentRawStream(kernel_.device_index)


def launch(kernel_: Kernel, grid, block, args: Args, shared_mem: int = 0, stream: int | None = None) -> None:
    """Launch on `stream`, by default the current torch stream of the kernel's
    device, through the driver: CuPy's own argument handling costs tens of
    microseconds a launch."""
    get_device, set_device, launch_kernel = _driver_calls()
    gx, gy, gz = (*grid, 1, 1)[:3]
    bx, by, bz = (*block, 1, 1)[:3]
    if stream is None:
        stream = current_stream(kernel_)
    launch_args = (kernel_.function, gx, gy, gz, bx, by, bz, shared_mem, stream, ctypes.addressof(args.pointers), 0)
    if get_device() == kernel_.device_index:
        if getattr(_thread, "context_of", None) != kernel_.device_index:
            # The driver needs the device's context current on this thread; a thread
            # that made no runtime call yet (autograd's backward threads) has none.
            set_device(kernel_.device_index)
            _thread.context_of = kernel_.device_index
        launch_kernel(*launch_args)
    else:
        with _cupy().cuda.Device(kernel_.device_index):
            launch_kernel(*launch_args)


@functools.lru_cache(maxsize=None)
def _driver_calls():
    """CuPy's runtime getDevice and setDevice and the driver's launchKernel,
    looked up once (a kernel to launch means CuPy is there)."""
    cuda = _cupy().cuda
    return cuda.runtime.getDevice, cuda.runtime.setDevice, cuda.driver.launchKernel
