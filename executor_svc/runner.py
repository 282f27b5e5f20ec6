"""ModelRunner: runs one BatchPlan on a transformers model with a paged KV cache.

One step = validate the plan -> apply it to the request cache -> pack every
scheduled token into one ``[1, T]`` sequence (decodes first, then prefill
chunks) -> one forward with the paged attention function -> sample at the last
row of each sampling slice -> commit counters and tokens.

The runner decides nothing: block ids, chunk sizes and who samples all come
from the plan: the scheduler owns KV placement. It only refuses plans that would corrupt KV.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from contract.executor_info import ExecutorInfo
from contract.plan import BatchPlan, StepResult
from executor_svc import attention, cpu_kernels, kernel_modules, step_extras
from executor_svc import packed_linears as packed
from executor_svc.attention import PagedStep, PrefillChunk, PrefixGroup
from executor_svc.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    KVCache,
    kv_shape_from_config,
    num_blocks_for_device,
)
from executor_svc.models import LoadedModel, load_model
from executor_svc.request_cache import RequestCache, ScheduledChunk
from executor_svc.sampler import Sampler

# Cascade attention for decodes sharing prefix blocks pays off once the copies it saves,
# (group size - 1) x prefix tokens per layer, outweigh a group's extra small ops (about
# ten per layer); docs/executor.md, 'Shared prefixes: cascade attention'.
CASCADE_MIN_SAVED_TOKENS = 256

# Steps with fewer tokens than this run on ``small_step_threads`` (docs/executor.md, 'Threads'):
# a decode step is hundreds of small ops, each a parallel region that waits for its slowest
# thread, so on a machine shared with the gateway and scheduler it gains little from the last core.
SMALL_STEP_TOKENS = 256


class ModelRunner:
    """The torch implementation of :class:`executor_svc.runner_api.Runner`.

    Args:
        model: "default" (SmolLM2-135M), a preset name (``models.PRESETS``), a
            local folder, or an already loaded :class:`LoadedModel`.
        load_format: "auto" or "dummy" (random weights), see ``models.load_model``.
        num_blocks / kv_bytes / memory_fraction / max_num_blocks: KV sizing, see
            ``kv_cache.num_blocks_for_device``.
        max_model_len: cap on prompt + outputs per request (default: the
            model's max_position_embeddings, and its sliding window if any).
        attention_backend: None (auto), "sdpa" or "flash-attn".
        num_threads: torch intra-op threads (process-wide); None leaves torch's
            default. On a CPU shared with other busy processes, fewer threads than
            cores avoids OpenMP spin-wait collapse (10x slower steps measured).
        cascade_attention: decodes that share prefix blocks attend to the shared
            prefix once per group (``attention._cascade``); False: every decode
            gathers its whole context. ``cascade_min_saved_tokens`` is the
            smallest (group size - 1) x prefix length that uses it.
        small_step_threads: intra-op threads for steps of fewer than
            ``SMALL_STEP_TOKENS`` tokens (decode steps); "auto": one fewer than
            ``num_threads`` (at least 1); None: the same as every step.
        packed_linears: prepack the weights for oneDNN and fuse q/k/v and gate/up
            (``packed_linears.pack_linears``); None: in bf16 wherever it applies, in fp32 where
            it measures faster than ``F.linear`` at load (``packed_linears.packing_pays``);
            True where it does not raises ValueError. Mutates a passed ``LoadedModel``.
        cpu_kernels: use the C++ kernels (``executor_svc.cpu_kernels``): decode attention
            that reads KV blocks where they lie, the KV write and temperature sampling (fp32
            and bf16); RMSNorm, rotary embedding, SiLU * up and the layers' step forward
            (bf16, ``kernel_modules.use_kernels``; fp32 keeps transformers' ops, which the
            generate-equality tests pin). None: wherever they apply (CPU, fp32/bf16, "sdpa"
            backend) and build (a C++ compiler is present), else torch's ops; True where they
            cannot raises ValueError. Mutates a passed ``LoadedModel`` in bf16.
    """

    def __init__(
        self,
        model: str | LoadedModel = "default",
        *,
        load_format: str = "auto",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_blocks: int | None = None,
        kv_bytes: int | None = None,
        memory_fraction: float = 0.9,
        max_num_blocks: int | None = None,
        max_model_len: int | None = None,
        attention_backend: str | None = None,
        seed: int = 0,
        num_threads: int | None = None,
        cascade_attention: bool = True,
        cascade_min_saved_tokens: int = CASCADE_MIN_SAVED_TOKENS,
        small_step_threads: int | str | None = None,
        packed_linears: bool | None = None,
        cpu_kernels: bool | None = None,
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.num_threads = torch.get_num_threads()
        if small_step_threads == "auto":
            small_step_threads = max(1, self.num_threads - 1)
        if small_step_threads is not None and not (isinstance(small_step_threads, int) and small_step_threads >= 1):
            raise ValueError(f"small_step_threads must be 'auto' or >= 1, got {small_step_threads!r}")
        self.small_step_threads = small_step_threads or self.num_threads
        self.loaded = model if isinstance(model, LoadedModel) else load_model(
            model, load_format=load_format, dtype=dtype, device=device, seed=seed
        )
        self.model = self.loaded.model
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        if packed_linears and not packed.packing_supported(self.device, self.dtype):
            raise ValueError(f"packed_linears needs a CPU model in {packed.PACKED_DTYPES} and torch built with "
                             f"oneDNN; this one is {self.dtype} on {self.device}")
        if packed_linears is None:
            packed_linears = (packed.packing_supported(self.device, self.dtype)
                              and packed.packing_pays(self.model, self.dtype))
        self.packed_linears = packed_linears and packed.pack_linears(self.model) > 0
        config = self.model.config
        self.backend = attention.select_backend(self.device, self.dtype, attention_backend)
        self.model.set_attn_implementation(attention.register())
        shape = kv_shape_from_config(config, block_size, self.dtype)
        n = num_blocks_for_device(shape, self.device, num_blocks=num_blocks, kv_bytes=kv_bytes,
                                  memory_fraction=memory_fraction, max_blocks=max_num_blocks)
        self.kv = KVCache(shape, n, self.device)
        limit = config.max_position_embeddings
        if getattr(config, "sliding_window", None):
            # NOTE: the paged path attends to the full context; capping the length
            # at the window keeps that exact for sliding-window models.
            limit = min(limit, config.sliding_window)
        self.max_model_len = min(limit, max_model_len) if max_model_len else limit
        self.requests = RequestCache(block_size=block_size, num_blocks=n, max_model_len=self.max_model_len)
        self._arange_block = torch.arange(block_size, device=self.device)
        self._gather_k: torch.Tensor | None = None
        self._gather_v: torch.Tensor | None = None
        self.cascade_attention = cascade_attention
        self.cascade_min_saved_tokens = cascade_min_saved_tokens
        self.kernels = self._kernels(cpu_kernels)
        if self.kernels is not None and self.dtype == torch.bfloat16:
            kernel_modules.use_kernels(self.model, self.kernels)
        self.sampler = Sampler(self.device, seed=seed, kernels=self.kernels)

    def _kernels(self, wanted: bool | None) -> cpu_kernels.CpuKernels | None:
        if wanted is False:
            return None
        applies = (self.device.type == "cpu" and self.backend == "sdpa" and self.dtype in cpu_kernels.SUPPORTED_DTYPES
                   and self.kv.shape.head_dim <= cpu_kernels.MAX_HEAD_DIM)
        kernel = cpu_kernels.load() if applies else None
        if wanted and kernel is None:
            why = cpu_kernels.unavailable_reason() if applies else (
                f"it needs the sdpa backend on CPU in {cpu_kernels.SUPPORTED_DTYPES}, "
                f"head size <= {cpu_kernels.MAX_HEAD_DIM}; this is {self.backend} on {self.device} in {self.dtype}")
            raise ValueError(f"cpu_kernels: {why}")
        return kernel

    # ---- Runner protocol ------------------------------------------------------------
    def info(self) -> ExecutorInfo:
        cfg = self.model.config
        return ExecutorInfo(
            model=self.loaded.name, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            attention_backend=self.backend, block_size=self.kv.block_size, num_blocks=self.kv.num_blocks,
            max_model_len=self.max_model_len, vocab_size=cfg.vocab_size, eos_token_ids=self.loaded.eos_token_ids,
            num_layers=cfg.num_hidden_layers, kv_bytes_per_block=self.kv.shape.bytes_per_block,
        )

    def release(self, req_ids: Iterable[str]) -> None:
        self.requests.release(req_ids)

    def execute(self, plan: BatchPlan) -> StepResult:
        t0 = time.perf_counter_ns()
        self.requests.check(plan)  # raises PlanError before anything changes
        chunks = self.requests.apply(plan)
        if not chunks:
            return StepResult(step_id=plan.step_id, total_ns=time.perf_counter_ns() - t0)
        extras = self.requests.num_with_extras > 0  # NOTE: False: the plain path, no per-request checks
        if self.small_step_threads != self.num_threads:
            self._set_threads(sum(c.num_new_tokens for c in chunks))
        with torch.inference_mode():
            ids, pos, step, keep_rows, sample_chunks = self._prepare(chunks)
            prompt_rows = None
            if extras:
                prompt_rows = step_extras.prompt_rows(chunks)
                if prompt_rows.rows:
                    keep_rows = torch.cat([keep_rows, torch.tensor(prompt_rows.rows, dtype=torch.long,
                                                                   device=self.device)])
            t1 = time.perf_counter_ns()
            out = self.model(input_ids=ids, position_ids=pos, use_cache=False, paged=step, logits_to_keep=keep_rows)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter_ns()
            # NOTE: sampling and logprobs see fp32 logits whatever the model dtype: softmax/top-p
            # precision, and argmax over bf16 rows was 4x slower than over fp32 on CPU.
            raw = out.logits[0].float()  # [num_sampled (+ prompt logprob rows), vocab]
            logits = raw
            params = [c.state.sampling for c in sample_chunks]
            if extras:
                logits = step_extras.processed_logits(logits[:len(sample_chunks)], sample_chunks)
            tokens = self.sampler.sample(logits[:len(sample_chunks)], params,
                                         [c.state.num_tokens for c in sample_chunks])
            logprobs = {}
            if extras:
                logprobs = step_extras.collect(raw, logits, sample_chunks, tokens, prompt_rows)
        sampled = {c.state.req_id: t for c, t in zip(sample_chunks, tokens)}
        RequestCache.commit(chunks, sampled)
        t3 = time.perf_counter_ns()
        # result order follows the plan (new, then cached), not the packed order
        req_ids = tuple(c.state.req_id for c in chunks if c.sample)
        return StepResult(
            step_id=plan.step_id, req_ids=req_ids, token_ids=tuple(sampled[r] for r in req_ids),
            prepare_ns=t1 - t0, forward_ns=t2 - t1, sample_ns=t3 - t2, total_ns=t3 - t0,
            logprobs=tuple(logprobs.get(r) for r in req_ids) if logprobs else (),
        )

    def _set_threads(self, num_tokens: int) -> None:
        # NOTE: torch's thread count is per calling thread (an OpenMP setting), and steps run on
        # whichever worker thread the server hands them to: set it here, where the step runs.
        want = self.small_step_threads if num_tokens < SMALL_STEP_TOKENS else self.num_threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    # ---- input building ---------------------------------------------------------------
    def _slots(self, block_ids: list[int], start: int, end: int) -> list[int]:
        bs = self.kv.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def _read_slots(self, block_ids: list[int], length: int) -> torch.Tensor:
        bs = self.kv.block_size
        nb = -(-length // bs)
        bt = torch.tensor(block_ids[:nb], dtype=torch.long, device=self.device)
        return (bt[:, None] * bs + self._arange_block).reshape(-1)[:length]

    def _prepare(self, chunks: list[ScheduledChunk]):
        decodes = [c for c in chunks if c.is_decode]
        prefills = [c for c in chunks if not c.is_decode]
        groups: list[tuple[int, int]] = []  # (members, shared prefix blocks) in packed order
        if self.kernels is not None:
            # NOTE: the C++ kernel reads shared prefix blocks in place, so it needs no cascade; decodes
            # that share leading blocks go next to each other, so that its threads read those blocks
            # from cache rather than memory (docs/executor.md, 'C++ kernels (CPU)')
            decodes.sort(key=lambda c: c.state.block_ids[0] if c.state.block_ids else -1)
        elif len(decodes) > 1 and self.cascade_attention and self.backend == "sdpa":
            decodes, groups = self._prefix_groups(decodes)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last_row: dict[str, int] = {}
        for c in decodes:
            st = c.state
            ids.append(st.token_ids[c.start])
            pos.append(c.start)
            slots.append(st.block_ids[c.start // self.kv.block_size] * self.kv.block_size
                         + c.start % self.kv.block_size)
            last_row[st.req_id] = len(ids) - 1
        chunk_meta: list[PrefillChunk] = []
        for c in prefills:
            st, end = c.state, c.start + c.num_new_tokens
            q_start = len(ids)
            ids.extend(st.token_ids[c.start:end])
            pos.extend(range(c.start, end))
            slots.extend(self._slots(st.block_ids, c.start, end))
            read = self._read_slots(st.block_ids, end) if c.start > 0 else None
            chunk_meta.append(PrefillChunk(q_start, c.num_new_tokens, c.start, read))
            last_row[st.req_id] = len(ids) - 1
        dev = self.device
        step = PagedStep(kv=self.kv, backend=self.backend, kernels=self.kernels,
                         write_slots=torch.tensor(slots, dtype=torch.long, device=dev),
                         prefills=chunk_meta, num_decodes=len(decodes))
        if decodes:
            self._prepare_decodes(step, decodes, groups)
        gather_rows = max([0 if step.decode_slots is None else step.decode_slots.numel()]
                          + [c.context_len + c.q_len for c in chunk_meta if c.context_len])
        if gather_rows and self.backend == "sdpa":
            step.k_buf, step.v_buf = self._workspace(gather_rows)
        if self.backend == "flash-attn":  # pragma: no cover - CUDA + flash-attn only
            self._prepare_flash(step, decodes, prefills)
        sample_chunks = [c for c in decodes + prefills if c.sample]
        keep = torch.tensor([last_row[c.state.req_id] for c in sample_chunks], dtype=torch.long, device=dev)
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)[None]
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)[None]
        return ids_t, pos_t, step, keep, sample_chunks

    def _workspace(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reused flat K/V gather buffers for at least ``rows`` slots (grown, never shrunk)."""
        per_row = self.kv.shape.num_kv_heads * self.kv.shape.head_dim
        have = 0 if self._gather_k is None else self._gather_k.numel() // per_row
        if have < rows:
            rows = max(rows, int(1.25 * have))
            self._gather_k = torch.empty(rows * per_row, dtype=self.dtype, device=self.device)
            self._gather_v = torch.empty(rows * per_row, dtype=self.dtype, device=self.device)
        return self._gather_k, self._gather_v

    def _prefix_groups(self, decodes: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], list[tuple[int, int]]]:
        """Decodes reordered so that those sharing leading blocks are adjacent, and the groups worth a cascade.

        Returns ``(decodes, groups)``; ``groups`` lists ``(members, shared blocks)`` for the
        first rows of the new order, the remaining decodes are not grouped. Only whole
        blocks that lie entirely before every member's new token are shared: the scheduler
        shares full blocks only, and each member keeps at least its new token as suffix.
        """
        by_first: dict[int, list[ScheduledChunk]] = {}
        for c in decodes:
            if c.state.block_ids:
                by_first.setdefault(c.state.block_ids[0], []).append(c)
        bs = self.kv.block_size
        ordered: list[ScheduledChunk] = []
        groups: list[tuple[int, int]] = []
        grouped: set[int] = set()
        for members in by_first.values():
            if len(members) < 2:
                continue
            first = members[0].state.block_ids
            limit = min(c.start // bs for c in members)  # whole blocks before every member's new token
            shared = 0
            while shared < limit and all(c.state.block_ids[shared] == first[shared] for c in members):
                shared += 1
            if shared and (len(members) - 1) * shared * bs >= self.cascade_min_saved_tokens:
                ordered.extend(members)
                groups.append((len(members), shared))
                grouped.update(id(c) for c in members)
        if not groups:
            return decodes, []
        ordered.extend(c for c in decodes if id(c) not in grouped)
        return ordered, groups

    def _prepare_decodes(self, step: PagedStep, decodes: list[ScheduledChunk],
                         groups: list[tuple[int, int]]) -> None:
        bs = self.kv.block_size
        if self.kernels is not None:
            # block tables as they are; every table is at least ceil(length / bs) blocks long
            # (RequestCache.check), so the kernel never reads past a table
            lengths = [c.start + 1 for c in decodes]
            max_nb = -(-max(lengths) // bs)
            tables = [c.state.block_ids[:max_nb] for c in decodes]
            step.decode_tables = torch.tensor([t + [0] * (max_nb - len(t)) for t in tables], dtype=torch.int32)
            step.decode_lengths = torch.tensor(lengths, dtype=torch.int32)
            return
        skip = [0] * len(decodes)  # leading blocks a decode reads through its group's prefix instead
        row = 0
        for members, shared in groups:
            blocks = decodes[row].state.block_ids[:shared]
            # NOTE: a fresh cache hands out consecutive block ids, so a prefix computed by one
            # prefill often lies in one run of slots and is read in place. fp32 only: bf16 matmuls
            # copy such a strided view first and were slower than the gather (docs/executor.md,
            # 'Shared prefixes: cascade attention')
            consecutive = blocks == list(range(blocks[0], blocks[0] + shared))
            first = blocks[0] * bs if consecutive and self.dtype == torch.float32 else None
            step.decode_groups.append(PrefixGroup(row, row + members, self._read_slots(blocks, shared * bs), first))
            skip[row : row + members] = [shared] * members
            row += members
        lengths = [c.start + 1 - s * bs for c, s in zip(decodes, skip)]  # keys each decode gathers itself
        max_len = max(lengths)
        max_nb = -(-max_len // bs)
        # pad block tables with block 0: padded keys are masked out below
        table = []
        for c, s in zip(decodes, skip):
            own = c.state.block_ids[s : s + max_nb]
            table.append(own + [0] * (max_nb - len(own)))
        bt = torch.tensor(table, dtype=torch.long, device=self.device)
        step.decode_slots = (bt[:, :, None] * bs + self._arange_block).reshape(len(decodes), -1)[:, :max_len]
        if min(lengths) != max_len:
            lens = torch.tensor(lengths, device=self.device)
            valid = torch.arange(max_len, device=self.device)[None, :] < lens[:, None]
            step.decode_mask = valid[:, None, None, :]

    def _prepare_flash(self, step: PagedStep, decodes, prefills) -> None:  # pragma: no cover
        k_slots: list[torch.Tensor] = []
        cu_q, cu_k = [0], [0]
        for c in decodes + prefills:
            end = c.start + c.num_new_tokens
            k_slots.append(self._read_slots(c.state.block_ids, end))
            cu_q.append(cu_q[-1] + c.num_new_tokens)
            cu_k.append(cu_k[-1] + end)
            step.flash_max_q = max(step.flash_max_q, c.num_new_tokens)
            step.flash_max_k = max(step.flash_max_k, end)
        step.flash_k_slots = torch.cat(k_slots)
        step.flash_cu_q = torch.tensor(cu_q, dtype=torch.int32, device=self.device)
        step.flash_cu_k = torch.tensor(cu_k, dtype=torch.int32, device=self.device)
