"""Gateway test fixtures: a tiny byte-level tokenizer folder and an in-process fake scheduler.

The tokenizer has no merges across most non-ASCII bytes, so a multi-byte
character spans several tokens (what the incremental detokenizer must hold back).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from wire.grpc_server import AdmissionRejected, start_server
from wire.pb.slai.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 2  # <|im_end|>
MAX_MODEL_LEN = 256
CORPUS = ["Hello world! The capital of France is Paris.", "the quick brown fox jumps over the lazy dog",
          "system user assistant hello hello the the a a"] * 20


def build_tiny_model_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.token_to_id("<|im_end|>") == EOS_ID
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "model_max_length": MAX_MODEL_LEN}))
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": MAX_MODEL_LEN, "eos_token_id": EOS_ID}))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model") / "tiny-model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from gateway.tokenizer import ModelTokenizer

    return ModelTokenizer.from_dir(tiny_model_dir)


@dataclass
class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Streams a scripted reply: ``reply_ids`` (cycled when ignore_eos), then EOS or length."""

    reply_ids: list[int] = field(default_factory=list)
    tokens_per_event: int = 1
    delay_s: float = 0.0
    reject_retry_after_s: float | None = None  # set: Submit fails RESOURCE_EXHAUSTED
    submits: list = field(default_factory=list)
    cancelled: set = field(default_factory=set)
    aborted: set = field(default_factory=set)
    finished: set = field(default_factory=set)
    trace_contexts: list = field(default_factory=list)  # each Session submit's trace context
    clock: float = 100.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever cancelled/aborted grows

    async def wait_until(self, predicate, timeout_s: float = 30.0) -> None:
        """Wait until ``predicate()`` holds, re-checking on every cancel/abort (the timeout only guards a hang)."""

        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout_s)

    async def Submit(self, request, context):
        self.submits.append(request)
        if self.reject_retry_after_s is not None:
            raise AdmissionRejected("queue full", retry_after_s=self.reject_retry_after_s)
        rid, out = request.request_id, []
        ignore_eos = request.sampling.ignore_eos
        reply = self.reply_ids or [5]
        arrival = self.clock
        try:
            i = 0
            while True:
                batch = []
                finish = common_pb2.FINISH_REASON_UNSPECIFIED
                for _ in range(self.tokens_per_event):
                    if i < len(reply) or ignore_eos:
                        batch.append(reply[i % len(reply)])
                    else:
                        batch.append(EOS_ID)
                        finish = common_pb2.FINISH_REASON_STOP
                    i += 1
                    out.extend(batch[-1:])
                    if finish:
                        break
                    if len(out) >= request.max_tokens:
                        finish = common_pb2.FINISH_REASON_LENGTH
                        break
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.clock += 0.01
                ev = scheduler_pb2.TokenEvent(request_id=rid, token_ids=batch, finish_reason=finish, time_s=self.clock,
                                              ttft_s=self.clock - arrival if len(out) == len(batch) else 0.0,
                                              tbt_s=0.0 if len(out) == len(batch) else 0.01)
                if finish:
                    ev.usage.prompt_tokens = len(request.prompt_token_ids)
                    ev.usage.completion_tokens = len(out)
                    ev.timings.ttft_s, ev.timings.e2e_s, ev.timings.max_tbt_s = 0.01, self.clock - arrival, 0.01
                    self.finished.add(rid)
                    yield ev
                    return
                yield ev
        except asyncio.CancelledError:
            self.cancelled.add(rid)
            self.changed.set()
            raise

    async def Session(self, request_iterator, context):
        """The Submit script of each request, multiplexed on one stream (what the gateway speaks):
        an abort message cancels the request's script, a rejection comes back as a RequestError."""
        out: asyncio.Queue = asyncio.Queue()
        tasks: dict[str, asyncio.Task] = {}

        async def run(sub) -> None:
            rid = sub.request.request_id
            try:
                async for ev in self.Submit(sub.request, context):
                    out.put_nowait(scheduler_pb2.SchedulerMessage(events=[ev]))
            except AdmissionRejected as exc:
                out.put_nowait(scheduler_pb2.SchedulerMessage(errors=[scheduler_pb2.RequestError(
                    request_id=rid, code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message=str(exc),
                    retry_after_s=exc.retry_after_s)]))

        async def read() -> None:
            async for msg in request_iterator:
                if msg.WhichOneof("kind") == "submit":
                    self.trace_contexts.append(dict(msg.submit.trace_context))
                    tasks[msg.submit.request.request_id] = asyncio.get_running_loop().create_task(run(msg.submit))
                elif (task := tasks.get(msg.abort.request_id)) is not None:
                    self.aborted.add(msg.abort.request_id)
                    task.cancel()

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                yield await out.get()
        finally:
            reader.cancel()
            for task in tasks.values():
                task.cancel()

    async def Abort(self, request, context):
        self.aborted.add(request.request_id)
        self.changed.set()
        return scheduler_pb2.AbortResponse(found=request.request_id not in self.finished)

    async def Stats(self, request, context):
        return scheduler_pb2.StatsResponse(policy="fake")


@dataclass
class Stack:
    fake: FakeScheduler
    scheduler_port: int
    grpc_port: int
    http_port: int
    running: object
    tokenizer: object

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


async def start_stack(model_dir: Path, keys=None, fake: FakeScheduler | None = None, scheduler_address: str = "",
                      **config_kw) -> tuple[Stack, object]:
    from gateway.auth import open_store
    from gateway.config import GatewayConfig
    from gateway.server import start_gateway
    from gateway.service import GenerationService
    from gateway.tokenizer import ModelTokenizer

    fake = fake or FakeScheduler()
    sched = None
    if not scheduler_address:
        sched = await start_server([lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fake, s)],
                                   ["slai.v1.SchedulerService"], "127.0.0.1:0")
        scheduler_address = f"127.0.0.1:{sched.port}"
    config = GatewayConfig(scheduler_address=scheduler_address, grpc_address="127.0.0.1:0", http_host="127.0.0.1",
                           http_port=0, model_dir=str(model_dir), drain_timeout_s=1.0, **config_kw)
    tokenizer = ModelTokenizer.from_dir(model_dir)
    service = GenerationService(config, tokenizer)
    running = await start_gateway(config, service, keys or open_store())
    stack = Stack(fake, sched.port if sched else 0, running.grpc_port, running.http_port, running, tokenizer)
    return stack, sched


@pytest.fixture
async def stack(tiny_model_dir):
    st, sched = await start_stack(tiny_model_dir)
    st.fake.reply_ids = st.tokenizer.encode("Hello wörld, ça va? 😀 The end.", add_special_tokens=False)
    yield st
    await st.running.stop(0.5)
    await sched.stop(0)


@pytest.fixture
async def gw_channel(stack):
    async with grpc.aio.insecure_channel(stack.grpc_address) as ch:
        yield ch
