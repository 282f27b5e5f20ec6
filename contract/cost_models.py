"""Step-time cost models for the simulator.

One model shape covers everything the project uses::

    T(plan) = max(a0, a1 + b * batch_tokens)
              + c * num_decodes
              + d * sum_decode_context
              + e * sum_prefill_chunk_context
              + m * max(0, num_decodes - s * batch_tokens)    [only in a mixed step]
              + overhead                                  (all in milliseconds)

* ``batch_tokens``   = prefill chunk tokens + decode tokens of the plan;
* ``num_decodes``    = decode slices in the plan;
* ``sum_decode_context`` = SUM over the plan's decodes of the KV context each one
  attends to, i.e. the slice's ``num_computed_tokens`` (tokens already cached);
* ``sum_prefill_chunk_context`` = SUM over prefill chunks of
  ``chunk * (num_computed_tokens + chunk)``: the chunk's tokens times the context
  its last token attends to (a proxy for attention FLOPs);
* the *mixing penalty*: a step holding both prefill chunks and decodes pays
  ``m`` per decode above the share ``s`` of its tokens (``mix_ms_per_decode``,
  ``mix_decode_share``). On bandwidth-limited GPUs a decode's marginal cost in a
  mixed batch exceeds its cost in a pure decode batch once decodes are more than
  about 20% of the step (prefill-decode interference, arXiv 2606.00516);
* ``overhead`` = a fixed per-step cost (scheduling, RPC) added to every step.

The built-in ``paper`` model is the RTX 6000 Ada fit
``T = max(23.4 ms, 6.95 ms + 0.0912 ms x tokens)`` with c = d = e = 0, fitted to
the authors' one published step-time measurement (Fig. 5(a): a 2048-token prompt
at budgets 64-1024). Its data were measured end to end by the authors' engine,
so scheduling overhead is already inside the constants; its ``overhead_ms`` is therefore 0.

The built-in ``gpu`` model (``GPU_MODEL``) keeps the paper's batch-size terms and
adds what that fit cannot show, as a GPU-shaped stress model rather than a fit:
a per-decode cost, decode attention reading each context token's KV, prefill
attention over the chunk's context, and the mixing penalty. See docs/results.md (GPU-shaped cost model).

Model files are JSON objects with the field names of :class:`CostModel`.
A fitter (:func:`fit_cost_model`) builds one from measured step timings.

No grpc or torch here; numpy is used only by the fitter.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable

from contract.plan import BatchPlan


@dataclass(frozen=True, slots=True)
class CostModel:
    """Step time of a batch plan, in milliseconds (see the module docstring)."""

    name: str = "custom"
    a0_ms: float = 0.0  # floor of the batch-size term (memory-bound step)
    a1_ms: float = 0.0  # intercept of the compute-bound line
    b_ms_per_token: float = 0.0  # slope per batch token
    c_ms_per_decode: float = 0.0  # extra cost per decode
    d_ms_per_context_token: float = 0.0  # per token of decode KV context (summed over decodes)
    e_ms_per_chunk_context: float = 0.0  # per (chunk x context) of prefill chunks
    overhead_ms: float = 0.0  # fixed per-step overhead added to every step
    description: str = ""
    mix_ms_per_decode: float = 0.0  # mixed step: extra cost per decode above mix_decode_share of its tokens
    mix_decode_share: float = 0.2  # decode share of a mixed step above which the mixing penalty applies

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"cost model field {f.name} must be finite, got {v}")
        if not 0.0 <= self.mix_decode_share <= 1.0:
            raise ValueError(f"cost model field mix_decode_share must be in [0, 1], got {self.mix_decode_share}")

    # ---- evaluation ----
    @property
    def needs_context(self) -> bool:
        """True when the plan's slices must be walked (context terms are non-zero)."""
        return bool(self.d_ms_per_context_token or self.e_ms_per_chunk_context)

    def time_ms(self, batch_tokens: int, num_decodes: int = 0, sum_decode_context: float = 0.0,
                sum_chunk_context: float = 0.0) -> float:
        """Step time from the plan's aggregate features (overhead included)."""
        base = self.a1_ms + self.b_ms_per_token * batch_tokens
        if base < self.a0_ms:
            base = self.a0_ms
        t = (base + self.c_ms_per_decode * num_decodes + self.d_ms_per_context_token * sum_decode_context
             + self.e_ms_per_chunk_context * sum_chunk_context + self.overhead_ms)
        if self.mix_ms_per_decode and 0 < num_decodes < batch_tokens:  # prefill and decode in one step
            excess = num_decodes - self.mix_decode_share * batch_tokens
            if excess > 0:
                t += self.mix_ms_per_decode * excess
        return t

    def step_time_s(self, plan: BatchPlan) -> float:
        """Step time of ``plan`` in seconds, including the fixed overhead.

        Uses the plan's ``stats`` when they count its tokens; otherwise (a plan decoded
        off the wire carries no stats, e.g. in the fake executor) walks its slices.
        """
        st = plan.stats
        n = st.num_prefill_tokens + st.num_decodes
        if n and not (self.d_ms_per_context_token or self.e_ms_per_chunk_context):  # not self.needs_context
            return 1e-3 * self.time_ms(n, st.num_decodes)
        f = plan_features(plan)
        return 1e-3 * self.time_ms(f["batch_tokens"], f["num_decodes"], f["sum_decode_context"],
                                   f["sum_chunk_context"])

    def full_step_s(self, tokens: int) -> float:
        """Time of a prefill-only step of ``tokens`` tokens at zero context (stability bound's t_b)."""
        return 1e-3 * self.time_ms(tokens)

    def request_extra_ms(self, prompt_len: int, output_len: int) -> float:
        """The least time one request adds beyond its tokens' share of full steps: its decodes' own
        cost and KV context, and its prompt's (chunk x context) pairs, at their least (P^2 / 2, as if
        chunks were infinitely fine). The mixing penalty is not counted, so a bound built on this stays
        an upper bound (``simulator.cli_args.stability_bound``). Zero for the paper's fit."""
        decodes = max(0, output_len - 1)  # the first output token comes with the prompt's last chunk
        # the j-th decode (j = 1..decodes) attends to prompt_len + j - 1 cached tokens
        context = decodes * prompt_len + decodes * (decodes - 1) / 2
        return (self.c_ms_per_decode * decodes + self.d_ms_per_context_token * context
                + self.e_ms_per_chunk_context * prompt_len * prompt_len / 2)

    def with_overhead(self, overhead_ms: float) -> CostModel:
        return replace(self, overhead_ms=overhead_ms)

    # ---- files ----
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.mix_ms_per_decode:
            # NOTE: a model without the mixing penalty keeps its pre-penalty field set, so the
            # `sim --json` output of every existing model stays byte-for-byte the same
            del d["mix_ms_per_decode"], d["mix_decode_share"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"fit"}
        if unknown:
            raise ValueError(f"unknown cost model fields: {sorted(unknown)}")
        kw = {k: (str(v) if k in ("name", "description") else float(v)) for k, v in d.items() if k in known}
        return cls(**kw)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        d = self.to_dict()
        if extra:
            d["fit"] = extra
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


PAPER_MODEL = CostModel(
    name="paper-rtx6000ada-mistral7b", a0_ms=23.4, a1_ms=6.95, b_ms_per_token=0.0912,
    # NOTE: this label is part of `sim --json` output, kept byte-for-byte so results stay comparable
    # across versions; "paper.md 10.2" names the authors' Fig. 5(a) fit of the RTX 6000 Ada step time.
    description="paper.md 10.2: T = max(23.4, 6.95 + 0.0912 x tokens) ms, Mistral-7B fp16 on RTX 6000 Ada")

# A GPU-shaped stress model for the same GPU and model (RTX 6000 Ada, 960 GB/s, Mistral-7B
# fp16 with 8 KV heads: 128 KiB of KV per token). Not a fit: each added term is sized from
# the hardware, so a policy's lead can be checked where decodes and mixing are not free.
GPU_MODEL = CostModel(
    name="gpu-shaped-rtx6000ada-mistral7b", a0_ms=23.4, a1_ms=6.95, b_ms_per_token=0.0912,
    c_ms_per_decode=0.03,  # per-sequence work of a decode (sampling, paged-attention metadata)
    d_ms_per_context_token=1.4e-4,  # 128 KiB of KV read per context token at 960 GB/s
    e_ms_per_chunk_context=2.6e-6,  # ~0.5 MFLOP per (query, key) pair at ~200 TFLOP/s
    mix_ms_per_decode=0.1, mix_decode_share=0.2,  # interference above 20% decodes (arXiv 2606.00516)
    description="paper fit + 0.03 ms/decode + 1.4e-4 ms/decode context token + 2.6e-6 ms/(chunk x context)"
                " + 0.1 ms per decode above 20% of a mixed step")

BUILTIN_MODELS = {"paper": PAPER_MODEL, "gpu": GPU_MODEL}


def resolve_cost_model(spec: str | None, overhead_ms: float | None = None) -> CostModel:
    """``None``/``"paper"`` -> the built-in fit; ``"gpu"`` -> the GPU-shaped model;
    anything else is a JSON model file."""
    model = BUILTIN_MODELS.get(spec or "paper")
    if model is None:
        model = CostModel.load(spec)
    if overhead_ms is not None:
        model = model.with_overhead(overhead_ms)
    return model


def plan_features(plan: BatchPlan) -> dict[str, float]:
    """The cost model's inputs for one plan (context from slices' num_computed_tokens)."""
    num_decodes = 0
    batch_tokens = 0
    dctx = 0
    cctx = 0
    for s in plan.new:
        n = s.num_new_tokens
        batch_tokens += n
        cctx += n * (s.num_computed_tokens + n)
    for s in plan.cached:
        n = s.num_new_tokens
        batch_tokens += n
        if s.is_decode:
            num_decodes += 1
            dctx += s.num_computed_tokens
        else:
            cctx += n * (s.num_computed_tokens + n)
    return {"batch_tokens": batch_tokens, "num_decodes": num_decodes, "sum_decode_context": float(dctx),
            "sum_chunk_context": float(cctx)}


# ---------------------------------------------------------------- fitting
TIME_COLUMNS = ("forward_ms", "total_ms", "forward_ns", "total_ns", "step_ms", "step_s")


def load_timings(path: str | Path, time_column: str | None = None) -> list[dict[str, float]]:
    """Rows of measured steps from CSV or JSON (a list of objects, or {"steps": [...]}).

    Columns: ``num_prefill_tokens``, ``num_decodes``, ``decode_context`` (SUM of the
    decodes' KV context; a ``decode_context_mean`` column is multiplied by
    ``num_decodes`` instead), optional ``chunk_context`` (SUM of chunk x context),
    and a time: ``forward_ms`` or ``total_ms`` (or ``*_ns``, ``step_s``). Each row
    becomes {"batch_tokens", "num_decodes", "sum_decode_context", "sum_chunk_context", "ms"}.
    """
    p = Path(path)
    text = p.read_text()
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        data = json.loads(text)
        raw = data["steps"] if isinstance(data, dict) else data
    else:
        raw = list(csv.DictReader(text.splitlines()))
    if not raw:
        raise ValueError(f"{path}: no rows")
    cols = set(raw[0])
    tcol = time_column or next((c for c in TIME_COLUMNS if c in cols), None)
    if tcol is None or tcol not in cols:
        raise ValueError(f"{path}: need one of the time columns {TIME_COLUMNS}, got {sorted(cols)}")
    scale = {"_ns": 1e-6, "_s": 1e3}.get(tcol[tcol.rfind("_"):], 1.0)
    rows = []
    for r in raw:
        npf = float(r.get("num_prefill_tokens", 0) or 0)
        nd = float(r.get("num_decodes", 0) or 0)
        if "decode_context" in r and r["decode_context"] not in ("", None):
            dctx = float(r["decode_context"])
        elif "decode_context_mean" in r and r["decode_context_mean"] not in ("", None):
            dctx = float(r["decode_context_mean"]) * nd
        else:
            dctx = 0.0
        cctx = float(r.get("chunk_context", 0) or 0)
        rows.append({"batch_tokens": npf + nd, "num_decodes": nd, "sum_decode_context": dctx,
                     "sum_chunk_context": cctx, "ms": float(r[tcol]) * scale})
    return rows


def fit_cost_model(rows: Iterable[dict[str, float]], name: str = "fitted", overhead_ms: float = 0.0,
                   relative: bool = False, terms: tuple[str, ...] | None = None) -> tuple[CostModel, dict[str, Any]]:
    """Least-squares fit of ``max(a0, a1 + b x) + c n_d + d ctx + e cc`` to measured steps.

    The hinge is fitted by trying every knee between consecutive distinct batch
    sizes: rows at or below the knee share the flat level ``a0``, rows above it the
    line ``a1 + b x``; ``c, d, e`` are shared. The knee with the smallest residual
    wins. Extra terms whose column is all zero are left out (coefficient 0).
    ``relative=True`` minimises relative instead of absolute error.
    Returns the model and fit diagnostics (rmse_ms, mape, knee_tokens, n).
    """
    import numpy as np

    rows = list(rows)
    if len(rows) < 2:
        raise ValueError("need at least 2 timing rows to fit")
    x = np.array([r["batch_tokens"] for r in rows], dtype=float)
    y = np.array([r["ms"] for r in rows], dtype=float)
    extra_names = ("num_decodes", "sum_decode_context", "sum_chunk_context")
    extra = np.array([[r[k] for k in extra_names] for r in rows], dtype=float).reshape(len(rows), 3)
    use = [i for i, k in enumerate(extra_names)
           if np.any(extra[:, i] != 0) and (terms is None or k in terms)]
    w = 1.0 / np.maximum(np.abs(y), 1e-9) if relative else np.ones_like(y)

    xs = np.unique(x)
    knees = [-math.inf] + [float(v) for v in xs]  # split: flat if x <= knee
    best = None
    for k in knees:
        flat = x <= k
        cols = []
        if flat.any():
            cols.append(flat.astype(float))
        lin = ~flat
        if lin.any():
            cols.append(lin.astype(float))
            if len(np.unique(x[lin])) > 1:
                cols.append(lin * x)
        cols.extend(extra[:, i] for i in use)
        A = np.column_stack(cols)
        coef, *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
        resid = (A @ coef - y) * w
        sse = float(resid @ resid)
        if best is None or sse < best[0] - 1e-12:
            best = (sse, k, coef, flat)
    _, knee, coef, flat = best
    it = iter(coef)
    a0 = float(next(it)) if flat.any() else 0.0
    a1 = b = 0.0
    if (~flat).any():
        a1 = float(next(it))
        if len(np.unique(x[~flat])) > 1:
            b = float(next(it))
    ex = {extra_names[i]: float(next(it)) for i in use}
    if not flat.any():
        a0 = 0.0
    elif not (~flat).any():
        a1, b = a0, 0.0
    model = CostModel(
        name=name, a0_ms=a0, a1_ms=a1, b_ms_per_token=b,
        c_ms_per_decode=ex.get("num_decodes", 0.0),
        d_ms_per_context_token=ex.get("sum_decode_context", 0.0),
        e_ms_per_chunk_context=ex.get("sum_chunk_context", 0.0),
        overhead_ms=overhead_ms,
        description=f"least-squares fit to {len(rows)} measured steps")
    pred = np.array([model.time_ms(r["batch_tokens"], r["num_decodes"], r["sum_decode_context"],
                                   r["sum_chunk_context"]) - overhead_ms for r in rows])
    err = pred - y
    diag = {"n": len(rows), "knee_tokens": None if math.isinf(knee) else float(knee),
            "rmse_ms": float(np.sqrt(np.mean(err ** 2))),
            "mape": float(np.mean(np.abs(err) / np.maximum(np.abs(y), 1e-9))),
            "relative": relative, "terms": ["a0", "a1", "b"] + [extra_names[i] for i in use]}
    return model, diag
