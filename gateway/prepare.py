"""From a client's input to a ready ``SubmitRequest``: size check, validation, chat template, tokenizing.

The cheap checks run first and on the event loop; a long input is prepared on a worker thread so it
never stalls other streams (docs/gateway.md, "Transport limits").
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gateway.config import GatewayConfig, TierPolicy
from gateway.scheduler_client import submit_request
from gateway.tokenizer import LONG_TEXT_CHARS, ModelTokenizer
from gateway.types import GenerationInput
from gateway.validation import check_input, clip
from wire.pb.slai.v1 import scheduler_pb2

# Inputs up to this many characters are validated and tokenized on the event loop (under a
# millisecond); longer ones on a worker thread, so a long prompt never stalls other streams.
# docs/gateway.md ("Transport limits") has the measurements behind the number.
INLINE_PREPARE_CHARS = LONG_TEXT_CHARS
# Worker threads for long inputs: leave a core to the event loop (encode_batch releases the GIL).
PREPARE_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))
# After an input this long, hand the tokenizer's freed scratch memory back to the OS (see _trim_heap).
TRIM_AFTER_CHARS = 64 << 10


@dataclass(slots=True)
class Prepared:
    """A validated, tokenized request, ready to submit."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    submit: scheduler_pb2.SubmitRequest


class Preparer:
    """Validates and tokenizes inputs for one model. ``in_flight(request_id)`` says whether an id is taken."""

    def __init__(self, config: GatewayConfig, tokenizer: ModelTokenizer, model_name: str, max_model_len: int,
                 in_flight: Callable[[str], bool]) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self._in_flight = in_flight
        # A prompt longer than this cannot fit max_model_len tokens: no token is longer than
        # max_token_chars characters. Checked before tokenizing, so rejecting it costs nothing.
        self.max_prompt_chars = max_model_len * tokenizer.max_token_chars
        self._pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="gateway-prepare")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_input_size(self, inp: GenerationInput) -> int:
        """Reject an input that cannot fit the model, without tokenizing it; its size in characters.

        Cheap (no pass over the text), so it runs before the costly work and on the event loop.
        """
        limit = self.max_model_len
        if inp.prompt_token_ids is not None:
            n = len(inp.prompt_token_ids)
            if n >= limit:
                raise ValueError(f"prompt: {n} tokens; this model allows at most {limit - 1} prompt tokens "
                                 f"({limit} in all)")
            return n
        if inp.messages is not None:
            if len(inp.messages) >= limit:  # every message adds at least one token
                raise ValueError(f"messages: {len(inp.messages)} messages cannot fit this model's {limit}-token "
                                 f"limit")
            # NOTE: contents only: a role is one of a few names (checked later, naming messages[i].role)
            size = sum(len(c) for _, c in inp.messages if isinstance(c, str))
            roles = sum(len(r) for r, _ in inp.messages if isinstance(r, str))
            field, cost = "messages", size + roles + 32 * len(inp.messages)  # the template's work per message
        else:
            size = len(inp.prompt or "")
            field, cost = "prompt", size
        if size > self.max_prompt_chars:
            raise ValueError(f"{field}: {size} characters cannot fit this model's {limit}-token limit (a token "
                             f"has at most {self.tokenizer.max_token_chars} characters, so at most "
                             f"{self.max_prompt_chars} characters)")
        return cost

    async def prepare_async(self, inp: GenerationInput, tier: TierPolicy) -> Prepared:
        """:meth:`prepare` after the cheap size check; a long input is prepared on a worker thread."""
        size = self.check_input_size(inp)
        if size <= INLINE_PREPARE_CHARS:
            return self.prepare(inp, tier)
        loop = asyncio.get_running_loop()
        prep = await loop.run_in_executor(self._pool, self._prepare_long, inp, tier, size)
        if self._in_flight(prep.request_id):  # prepare checked it, but the loop ran on meanwhile
            raise ValueError(f"request_id: {prep.request_id!r} is already in flight")
        return prep

    def _prepare_long(self, inp: GenerationInput, tier: TierPolicy, size: int) -> Prepared:
        try:
            return self.prepare(inp, tier)
        finally:
            if size > TRIM_AFTER_CHARS:
                _trim_heap()

    def _check_token_ids(self, inp: GenerationInput) -> None:
        """Token ids named by logit_bias and stop_token_ids exist in the vocabulary."""
        if not inp.logit_bias and not inp.stop_token_ids:
            return
        vocab = self.tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
        for tok, _ in inp.logit_bias:
            if not 0 <= tok < vocab:
                raise ValueError(f"logit_bias: token id {tok} is not in the vocabulary [0, {vocab})")
        for tok in inp.stop_token_ids:
            if not 0 <= tok < vocab:
                raise ValueError(f"stop_token_ids: token id {tok} is not in the vocabulary [0, {vocab})")

    def prepare(self, inp: GenerationInput, tier: TierPolicy) -> Prepared:
        """Validate and tokenize; raises ValueError naming the offending field."""
        check_input(inp, self.model_name, self.max_model_len)
        if inp.messages is not None:
            try:
                prompt_ids = self.tokenizer.encode_chat([{"role": r, "content": c} for r, c in inp.messages])
            except ValueError:
                raise
            except Exception as exc:  # jinja2 TemplateError from raise_exception in the template
                raise ValueError(f"messages: {exc}") from exc
        elif inp.prompt_token_ids is not None:
            prompt_ids = list(inp.prompt_token_ids)
            vocab = self.tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        else:
            if not inp.prompt:
                raise ValueError("prompt: must not be empty")
            prompt_ids = self.tokenizer.encode(inp.prompt)
        if not prompt_ids:
            raise ValueError("prompt: must not be empty (it encodes to no tokens)")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            field = "messages" if inp.messages is not None else "prompt"
            raise ValueError(f"{field}: {len(prompt_ids)} tokens; this model allows at most "
                             f"{self.max_model_len - 1} prompt tokens ({self.max_model_len} in all)")
        if inp.max_tokens < 0:
            raise ValueError(f"max_tokens: must be >= 1, got {inp.max_tokens}")
        self._check_token_ids(inp)
        if inp.score_only:
            if inp.max_tokens:
                raise ValueError(f"max_tokens: must be 0 to score the prompt only, got {inp.max_tokens}")
            # NOTE: the scheduler always generates; one token is the least, and the gateway drops it
            max_tokens = 1
        elif inp.max_tokens == 0:
            max_tokens = min(self.config.default_max_tokens, room)
        elif inp.max_tokens > room:
            raise ValueError(f"max_tokens: {inp.max_tokens} plus {len(prompt_ids)} prompt tokens exceeds the "
                             f"model's {self.max_model_len}-token limit (at most {room} here)")
        else:
            max_tokens = inp.max_tokens
        if inp.min_tokens > max_tokens:
            raise ValueError(f"min_tokens: {inp.min_tokens} is more than max_tokens ({max_tokens})")
        request_id = inp.request_id or f"gw-{uuid.uuid4().hex}"
        if self._in_flight(request_id):
            raise ValueError(f"request_id: {clip(request_id)} is already in flight")
        submit = submit_request(request_id, prompt_ids, max_tokens, inp, tier, self.tokenizer.eos_token_ids)
        return Prepared(request_id, prompt_ids, max_tokens, submit)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _trim_heap() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim``; elsewhere nothing).

    Tokenizing a long text allocates tens of MB of scratch (a 600 K-character prompt:
    about 90 MB) that glibc keeps in its free lists, and in the worker thread's own
    arena, after it is freed. Trimming takes about 10 ms, on the worker thread.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
