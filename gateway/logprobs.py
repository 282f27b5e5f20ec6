"""Logprobs on the gateway: what each delta carries, and their OpenAI shapes (docs/gateway.md, "Log probabilities").

The executor computes them (executor_svc/logprobs.py) and the scheduler passes them along per token;
here they are cut to the tokens a delta delivers, the prompt's are taken once, and the HTTP API
renders them: tokens as their own text (``ModelTokenizer.token_text``, as vLLM shows them), and for
completions a ``text_offset`` per token into the returned text (the running sum of the token texts
before it, from the echoed prompt's start with ``echo``, as vLLM counts).
"""

from __future__ import annotations

from collections.abc import Sequence

from contract.logprobs import TokenLogprob
from gateway.tokenizer import ModelTokenizer
from gateway.types import GenerationInput


class LogprobsTracker:
    """One request's logprobs as its token events arrive."""

    __slots__ = ("num_prompt_tokens", "prompt_done", "want_prompt", "want_tokens")

    def __init__(self, inp: GenerationInput, num_prompt_tokens: int) -> None:
        self.want_tokens = inp.logprobs is not None
        self.want_prompt = inp.prompt_logprobs is not None
        self.num_prompt_tokens = num_prompt_tokens
        self.prompt_done = False

    def prompt(self, lps: Sequence | None) -> tuple | None:
        """The prompt's logprobs if these tokens' values carry them for the first time.

        NOTE: the first wins. The executor sends them once (executor_svc/step_extras.py); a request the
        scheduler moved to another executor after a failure starts over with prompt + outputs as its
        prompt, and its second copy is dropped here.
        """
        if not self.want_prompt or self.prompt_done or not lps:
            return None
        for v in lps:
            if v is not None and v.prompt is not None:
                self.prompt_done = True
                return tuple(v.prompt[:max(0, self.num_prompt_tokens - 1)])
        return None

    def tokens(self, lps: Sequence | None, n: int) -> tuple | None:
        """The first ``n`` tokens' own entries (None for a token that carries none)."""
        if not self.want_tokens:
            return None
        if not lps:
            return (None,) * n
        return tuple(v.token if v is not None else None for v in lps[:n])


# ---------------------------------------------------------------- OpenAI shapes
def _top(tok: ModelTokenizer, t: TokenLogprob) -> dict[str, float]:
    # NOTE: like vLLM: the chosen token is always in the dict, with its top alternatives
    out = {tok.token_text(i): v for i, v in zip(t.top_ids, t.top_logprobs)}
    out.setdefault(tok.token_text(t.token_id), t.logprob)
    return out


class CompletionLogprobs:
    """``choices[i].logprobs`` of ``/v1/completions``: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tok: ModelTokenizer) -> None:
        self.tok = tok
        self.offset = 0  # characters of the returned text before the next token

    def render(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], *,
               first_is_unscored: bool = False) -> dict:
        """Entries for these tokens; ``first_is_unscored``: the prompt's first token (no logprob)."""
        tokens, lps, tops, offsets = [], [], [], []
        for j, tid in enumerate(token_ids):
            text = self.tok.token_text(tid)
            e = None if (first_is_unscored and j == 0) else entries[j - first_is_unscored]
            tokens.append(text)
            lps.append(e.logprob if e is not None else None)
            tops.append(_top(self.tok, e) if e is not None else None)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(parts: list[dict]) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k, values in out.items():
            values.extend(p[k])
    return out


def chat_logprobs(tok: ModelTokenizer, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None],
                  top_k: int) -> list[dict]:
    """``choices[i].logprobs.content`` of ``/v1/chat/completions`` for these tokens."""
    out = []
    for tid, e in zip(token_ids, entries):
        text = tok.token_text(tid)
        top = []
        if e is not None:
            top = [{"token": tok.token_text(i), "logprob": v, "bytes": list(tok.token_text(i).encode())}
                   for i, v in zip(e.top_ids[:top_k], e.top_logprobs[:top_k])]
        out.append({"token": text, "logprob": e.logprob if e is not None else None,
                    "bytes": list(text.encode()), "top_logprobs": top})
    return out
