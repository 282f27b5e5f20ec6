"""C++ kernels for the CPU executor, compiled on the machine that runs them (docs/executor.md,
"C++ kernels (CPU)").

* ``paged_decode.cpp``: every decode's attention over its KV blocks, read where they lie;
* ``elementwise.cpp``: RMSNorm (alone and after the residual add), rotary embedding, SiLU(gate) * up
  and the KV cache write, one pass each;
* ``sampling.cpp``: temperature sampling (no top-k/top-p) by inverse CDF, two passes per row.

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

SOURCES = tuple(Path(__file__).with_name(n) for n in ("paged_decode.cpp", "elementwise.cpp", "sampling.cpp"))
HEADERS = (Path(__file__).with_name("cpu_math.h"),)  # part of the build's cache key
CACHE_ENV = "SLAI_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 512  # kMaxHeadDim in cpu_math.h

_lock = threading.Lock()
_loaded: CpuKernels | None = None
_reason: str | None = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "slai-serve" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        path = shutil.which(name) if name else None
        if path:
            return path
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
    parts = [*(s.read_text() for s in SOURCES + HEADERS), cxx, version, *FLAGS, platform.machine(), _cpu_flags()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    target = cache_dir() / f"slai-kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: concurrent executors never load a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                              timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class CpuKernels:
    """The compiled library: one method per kernel, each checking what it is handed.

    NOTE: every call checks dtypes, shapes and layouts: a wrong pointer here reads or writes
    arbitrary memory. Index values (block tables, slots) are the caller's to keep in range;
    the runner builds them from plans that ``RequestCache.check`` has validated.
    """

    def __init__(self, path: Path) -> None:
        torch.empty(0)  # NOTE: torch (and its libgomp) is loaded before the library asks for libgomp
        lib = ctypes.CDLL(str(path))
        ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        signatures = {
            "paged_decode": [ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64, i32, i32, i32, i32, f32, ptr, i32],
            "rms_norm": [ptr, i64, ptr, i64, i64, f32, ptr, i32],
            "silu_and_mul": [ptr, i64, i64, i64, ptr, i32],
            "add_rms_norm": [ptr, ptr, i64, ptr, i64, i64, f32, ptr, i32],
            "rope": [ptr, i64, i64, i64, i32, i32, ptr, ptr],
            "kv_write": [ptr, ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, i64, i32, i32],
            "sample_rows": [ptr, i64, i64, i64, ptr, ptr, ptr, i32],
        }
        self._fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        for name, argtypes in signatures.items():
            for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
                if name == "sample_rows" and dtype != torch.float32:
                    continue  # logits are sampled in fp32 whatever the model's dtype
                fn = getattr(lib, f"slai_{name}_{suffix}")
                fn.restype = None
                fn.argtypes = argtypes
                self._fns[name, dtype] = fn
        self.path = path

    def _fn(self, name: str, dtype: torch.dtype, ok: bool):
        if not ok or dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: unexpected shapes, dtypes or layouts")
        return self._fns[name, dtype]

    def paged_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
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
        ok = (q.dtype == dtype and v_cache.dtype == dtype and out.dtype == dtype and q.stride(2) == 1
              and k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous()
              and tables.dtype == torch.int32 and lengths.dtype == torch.int32 and tables.is_contiguous()
              and lengths.is_contiguous() and tables.shape[0] == batch and lengths.shape[0] == batch
              and out.shape == (batch, heads, dim) and heads % num_kv == 0 and k_cache.shape[2] == dim
              and v_cache.shape == k_cache.shape and dim <= MAX_HEAD_DIM and q.device.type == "cpu")
        self._fn("paged_decode", dtype, ok)(
            q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), num_slots,
            tables.data_ptr(), tables.shape[1], lengths.data_ptr(), batch, num_kv, heads // num_kv, dim, block_size,
            scale, out.data_ptr(), torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' RMSNorm ``weight * to_dtype(x * rsqrt(mean(x^2) + eps))`` over the last dim, as one pass."""
        hidden = x.shape[-1]
        rows = x.reshape(-1, hidden)  # a view where the rows are evenly strided, else a copy
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ok = (x.device.type == "cpu" and weight.dtype == x.dtype and weight.is_contiguous()
              and weight.shape == (hidden,) and rows.stride(1) == 1)
        self._fn("rms_norm", x.dtype, ok)(rows.data_ptr(), rows.stride(0), weight.data_ptr(), rows.shape[0], hidden,
                                          eps, out.data_ptr(), torch.get_num_threads())
        return out

    def add_rms_norm(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``x += y`` in place (the residual stream, rounded as torch's add), then RMSNorm of the sum (returned).

        ``x`` contiguous ``[T, hidden]``; ``y`` ``[T, hidden]`` with a unit stride over hidden."""
        rows, hidden = x.shape
        out = torch.empty_like(x)
        ok = (x.device.type == "cpu" and x.is_contiguous() and y.shape == x.shape and y.dtype == x.dtype
              and y.stride(1) == 1 and weight.dtype == x.dtype and weight.is_contiguous() and weight.shape == (hidden,))
        self._fn("add_rms_norm", x.dtype, ok)(x.data_ptr(), y.data_ptr(), y.stride(0), weight.data_ptr(), rows,
                                              hidden, eps, out.data_ptr(), torch.get_num_threads())
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotary embedding of ``x`` ``[T, heads, D]`` (unit stride over D) in place, as transformers'
        ``apply_rotary_pos_emb`` computes and rounds it; ``cos``/``sin`` contiguous ``[T, D]``."""
        tokens, heads, dim = x.shape
        ok = (x.device.type == "cpu" and x.stride(2) == 1 and dim % 2 == 0 and dim <= MAX_HEAD_DIM
              and cos.shape == (tokens, dim) and sin.shape == cos.shape and cos.dtype == x.dtype
              and sin.dtype == x.dtype and cos.is_contiguous() and sin.is_contiguous())
        self._fn("rope", x.dtype, ok)(x.data_ptr(), x.stride(0), x.stride(1), tokens, heads, dim, cos.data_ptr(),
                                      sin.data_ptr())

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up = [gate | up]`` over the last dim (as transformers rounds it)."""
        inter = gate_up.shape[-1] // 2
        rows = gate_up.reshape(-1, 2 * inter)
        out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
        ok = gate_up.device.type == "cpu" and gate_up.shape[-1] % 2 == 0 and rows.stride(1) == 1
        self._fn("silu_and_mul", gate_up.dtype, ok)(rows.data_ptr(), rows.stride(0), rows.shape[0], inter,
                                                    out.data_ptr(), torch.get_num_threads())
        return out

    def sample_rows(self, logits: torch.Tensor, inv_temps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One column per row of fp32 ``logits`` ``[N, V]`` with probability ``softmax(logits * inv_temps)``,
        by inverse CDF at the fp64 uniforms ``u`` ``[N]``; ``[N]`` int64. Columns more than 87 below the
        row's scaled maximum (``-inf`` among them) are never drawn."""
        rows, vocab = logits.shape
        out = torch.empty(rows, dtype=torch.int64)
        ok = (logits.device.type == "cpu" and logits.stride(1) == 1 and inv_temps.dtype == torch.float32
              and inv_temps.shape == (rows,) and inv_temps.is_contiguous() and u.dtype == torch.float64
              and u.shape == (rows,) and u.is_contiguous() and u.device.type == "cpu")
        self._fn("sample_rows", logits.dtype, ok and logits.dtype == torch.float32)(
            logits.data_ptr(), logits.stride(0), rows, vocab, inv_temps.data_ptr(), u.data_ptr(), out.data_ptr(),
            torch.get_num_threads())
        return out

    def kv_write(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> None:
        """``k_cache[:, slots] = key`` and the same for V; caches contiguous ``[KV, slots, D]``, key/value ``[KV, T, D]``."""
        num_kv, num_slots, dim = k_cache.shape
        tokens = slots.shape[0]
        dtype = k_cache.dtype
        ok = (k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
              and v_cache.dtype == dtype and key.dtype == dtype and value.dtype == dtype
              and key.shape == (num_kv, tokens, dim) and value.shape == key.shape
              and key.stride(2) == 1 and value.stride(2) == 1 and slots.dtype == torch.int64
              and slots.is_contiguous() and k_cache.device.type == "cpu")
        self._fn("kv_write", dtype, ok)(
            k_cache.data_ptr(), v_cache.data_ptr(), num_slots, slots.data_ptr(), tokens, key.data_ptr(),
            key.stride(0), key.stride(1), value.data_ptr(), value.stride(0), value.stride(1), num_kv, dim)


def load() -> CpuKernels | None:
    """The compiled kernels, built on first use; ``None`` where it cannot be (see :func:`unavailable_reason`)."""
    global _loaded, _reason, _tried
    with _lock:
        if not _tried:
            _tried = True
            cxx = _compiler()
            if cxx is None:
                _reason = "no C++ compiler found ($CXX, c++ or g++)"
            else:
                try:
                    _loaded = CpuKernels(_build(cxx))
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _reason = f"building {', '.join(s.name for s in SOURCES)} failed: {exc}"
            if _reason:
                log.warning("C++ kernels unavailable, using torch's ops: %s", _reason)
        return _loaded


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` before the first call or when it loaded)."""
    return _reason
