"""C++ kernels for the CPU executor, compiled on the machine that runs them (docs/executor.md,
"Paged decode attention in C++").

The sources ship with the package; :func:`load` compiles them once with the system's C++
compiler (``$CXX``, else ``c++`` or ``g++``) for this CPU (``-march=native``) into
``~/.cache/slai-serve/kernels/`` (``$SLAI_KERNEL_CACHE`` overrides), keyed by the source, the
compiler, the flags and the CPU's feature flags, and loads the library through ``ctypes``.
Plain C entry points on raw pointers: no Python or torch headers, so a build takes about a
second. The OpenMP runtime is torch's own (the library asks for ``libgomp.so.1``, which the
dynamic linker resolves to the copy torch has already loaded).

Where no compiler is found or the build fails, :func:`load` returns ``None`` with the reason in
:func:`unavailable_reason`, and the runner keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.cpp")
CACHE_ENV = "SLAI_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 512  # kMaxHeadDim in paged_decode.cpp

_lock = threading.Lock()
_loaded: PagedDecodeKernel | None = None
_reason: str | None = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "slai-serve" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, *FLAGS, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"paged_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: concurrent executors never load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class PagedDecodeKernel:
    """``paged_decode.cpp`` loaded: one call per layer attends every decode of a step."""

    def __init__(self, path: Path) -> None:
        torch.empty(0)  # NOTE: torch (and its libgomp) is loaded before the library asks for libgomp
        lib = ctypes.CDLL(str(path))
        ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        self._fns = {}
        for dtype, name in ((torch.float32, "slai_paged_decode_f32"), (torch.bfloat16, "slai_paged_decode_bf16")):
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64, i32, i32, i32, i32, f32, ptr, i32]
            self._fns[dtype] = fn
        self.path = path

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor, block_size: int, scale: float, out: torch.Tensor) -> torch.Tensor:
        """Attention of ``B`` decodes over their paged KV, written into ``out``.

        Args:
            q: ``[B, H, D]`` (any strides with a unit stride over D), after RoPE.
            k_cache, v_cache: one layer's cache, contiguous ``[KV, slots, D]``.
            tables: int32 ``[B, max_blocks]`` block ids (contiguous), ``lengths``: int32 ``[B]``
                keys of each decode, its new token (already in the cache) included.
            out: contiguous ``[B, H, D]`` of the cache's dtype.
        """
        batch, heads, dim = q.shape
        num_kv, num_slots = k_cache.shape[0], k_cache.shape[1]
        dtype = k_cache.dtype
        # NOTE: checked on every call: a wrong pointer here reads or writes arbitrary memory
        if (q.dtype != dtype or v_cache.dtype != dtype or out.dtype != dtype or q.stride(2) != 1
                or not (k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous())
                or tables.dtype != torch.int32 or lengths.dtype != torch.int32 or not tables.is_contiguous()
                or not lengths.is_contiguous() or tables.shape[0] != batch or lengths.shape[0] != batch
                or out.shape != (batch, heads, dim) or heads % num_kv or k_cache.shape[2] != dim
                or v_cache.shape != k_cache.shape or dim > MAX_HEAD_DIM or dtype not in self._fns or q.device.type != "cpu"):
            raise ValueError("paged_decode: unexpected shapes, dtypes or layouts")
        self._fns[dtype](q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
                         num_slots, tables.data_ptr(), tables.shape[1], lengths.data_ptr(), batch, num_kv,
                         heads // num_kv, dim, block_size, scale, out.data_ptr(), torch.get_num_threads())
        return out


def load() -> PagedDecodeKernel | None:
    """The compiled kernel, built on first use; ``None`` where it cannot be (see :func:`unavailable_reason`)."""
    global _loaded, _reason, _tried
    with _lock:
        if not _tried:
            _tried = True
            cxx = _compiler()
            if cxx is None:
                _reason = "no C++ compiler found ($CXX, c++ or g++)"
            else:
                try:
                    _loaded = PagedDecodeKernel(_build(cxx))
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _reason = f"building {SOURCE.name} failed: {exc}"
            if _reason:
                log.warning("C++ paged decode attention unavailable, using torch's ops: %s", _reason)
        return _loaded


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` before the first call or when it loaded)."""
    return _reason
