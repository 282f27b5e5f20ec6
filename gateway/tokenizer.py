"""The model's tokenizer at the gateway: encode, chat template, incremental decode.

Loads only files from the model folder (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``, ``config.json``, ``generation_config.json``) with the
``tokenizers`` library and jinja2, so the gateway needs neither torch nor
transformers. The chat template is rendered the way transformers renders it
(sandboxed jinja2, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``).

:class:`IncrementalDetokenizer` turns token ids into text deltas that are always
complete characters: a character whose UTF-8 bytes span several tokens is held
back (the decoder shows it as U+FFFD) until its last byte arrives.
:class:`TextAssembler` adds stop strings on top: text that could be the start of
a stop string is held back, and a matched stop string is cut off.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context: leading-space rules of SentencePiece-style
# decoders depend on the previous token (vLLM uses the same 5).
_INITIAL_CONTEXT = 5
# A text longer than this is "long": the gateway prepares it on a worker thread (about 0.4 ms
# to tokenize inline at this size; a thread hop costs about as much), and it is encoded with
# encode_batch, which releases the GIL while it works (Tokenizer.encode holds it, so the event
# loop would stall all the same). Both give the same ids.
LONG_TEXT_CHARS = 1024


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


@dataclass
class ModelTokenizer:
    tokenizer: Tokenizer
    name: str
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 2048
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... -> text
    _template: Any = field(default=None, repr=False)
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path, name: str = "") -> ModelTokenizer:
        path = Path(model_dir).expanduser()
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found (the gateway needs the model's tokenizer.json)")
        tokenizer = Tokenizer.from_file(str(tok_file))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        model_cfg = _read_json(path / "config.json")
        gen_cfg = _read_json(path / "generation_config.json")

        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif isinstance(tok_cfg.get("chat_template"), str):
            template = tok_cfg["chat_template"]
        elif (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template")

        special = {k: v for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if (v := _token_content(tok_cfg.get(k))) is not None}
        eos: list[int] = _as_ids(gen_cfg.get("eos_token_id")) or _as_ids(model_cfg.get("eos_token_id"))
        if special.get("eos_token") is not None:
            tid = tokenizer.token_to_id(special["eos_token"])
            if tid is not None and tid not in eos:
                eos.append(tid)
        max_len = int(model_cfg.get("max_position_embeddings") or 0)
        tok_max = tok_cfg.get("model_max_length")
        if isinstance(tok_max, (int, float)) and 0 < tok_max < 10**9:
            max_len = min(max_len, int(tok_max)) if max_len else int(tok_max)
        return cls(tokenizer=tokenizer, name=name or path.name, eos_token_ids=tuple(eos),
                   max_model_len=max_len or 2048, chat_template=template, special_tokens=special)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of the vocabulary's longest token (special tokens included).

        A text of more than ``n * max_token_chars`` characters encodes to more than ``n``
        tokens (no token covers more text), which bounds a prompt before tokenizing it.
        """
        return max((len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    # ------------------------------------------------------------ encode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (what logprobs show for it, as vLLM does)."""
        cache = self._token_texts
        text = cache.get(token_id)
        if text is None:  # NOTE: bounded by the vocabulary
            text = cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the model's chat template (transformers' jinja2 settings)."""
        if not self.chat_template:
            raise ValueError("messages: this model has no chat template; send a prompt instead")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # NOTE: the template already writes the special tokens (transformers also
        # encodes a rendered template with add_special_tokens=False).
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def detokenizer(self, prompt_ids: list[int], stop: list[str] | None = None) -> TextAssembler:
        return TextAssembler(IncrementalDetokenizer(self.tokenizer, prompt_ids), stop or [])

    def repeatable_token(self) -> tuple[str, int]:
        """A text piece ``w`` such that ``w * n`` encodes to exactly ``n`` tokens.

        Load generators use it to build prompts of an exact token length (the
        gateway API takes text, not token ids).
        """
        for word in (" the", " a", " hello", " x", "a", "!", " ."):
            one = self.encode(word, add_special_tokens=False)
            if len(one) != 1:
                continue
            if len(self.encode(word * 64, add_special_tokens=False)) == 64:
                return word, one[0]
        raise ValueError("no single-token repeatable word found in this vocabulary")


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class IncrementalDetokenizer:
    """Token ids in, complete-character text deltas out (the vLLM/TGI offsets trick).

    ``prefix_offset..read_offset`` is text already emitted, kept as context so
    that decoding a slice renders spaces the same way as decoding the whole.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-_INITIAL_CONTEXT:])
        self.ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self._prefix_text: str | None = None  # decode of ids[prefix_offset:read_offset], until they move

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (maybe "")."""
        self.ids.append(int(token_id))
        prefix_text = self._prefix_text
        if prefix_text is None:  # NOTE: one decode per token instead of two while the offsets stay
            prefix_text = self._prefix_text = self._tok.decode(self.ids[self.prefix_offset:self.read_offset],
                                                               skip_special_tokens=self._skip)
        new_text = self._tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self._prefix_text = None
            return delta
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (an unfinished character stays U+FFFD)."""
        prefix_text = self._tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self._skip)
        new_text = self._tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self._skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix_text = None
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


class TextAssembler:
    """Detokenizes a request's outputs and applies its stop strings.

    ``add(ids)`` returns ``(delta, stopped)``. Text that might begin a stop
    string is held back until it cannot; once a stop string matches, the text
    from it on is dropped and ``stopped`` is True (the caller aborts upstream).
    ``num_tokens`` counts the tokens consumed (up to the stopping token).
    """

    def __init__(self, detok: IncrementalDetokenizer, stop: list[str]) -> None:
        self._detok = detok
        self._stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all text decoded so far (cut at a stop string; kept only with stop strings)
        self._sent = 0  # characters of self.text already returned
        self.num_tokens = 0
        self.stopped = False

    def add(self, token_ids: list[int] | tuple[int, ...]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stop:  # NOTE: no stop strings: nothing to hold back or keep (the common case, per token)
            detok = self._detok
            self.num_tokens += len(token_ids)
            if len(token_ids) == 1:
                return detok.add(token_ids[0]), False
            return "".join([detok.add(tid) for tid in token_ids]), False
        for tid in token_ids:
            self.num_tokens += 1
            piece = self._detok.add(tid)
            if piece and self._check_stop(piece):
                break
        return self._take(final=self.stopped), self.stopped

    def finish(self) -> str:
        """The request ended upstream: flush held-back text (stop strings still apply)."""
        if not self._stop:
            return self._detok.flush()
        if not self.stopped:
            piece = self._detok.flush()
            if piece:
                self._check_stop(piece)
        return self._take(final=True)

    def _check_stop(self, piece: str) -> bool:
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += piece
        if not self._stop:
            return False
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def _take(self, final: bool) -> str:
        end = len(self.text)
        if not final and self._stop:
            end -= self._held_back()
        end = max(end, self._sent)
        delta = self.text[self._sent:end]
        self._sent = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        tail = self.text[-(self._max_stop - 1):] if self._max_stop > 1 else ""
        for k in range(len(tail), 0, -1):
            suffix = tail[-k:]
            if any(s.startswith(suffix) for s in self._stop):
                return k
        return 0
