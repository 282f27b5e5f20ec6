"""Compact storage of prompt token ids (the core keeps 10k queued prompts cheaply)."""

from __future__ import annotations

from array import array


class TokenIds(array):
    """Token ids as packed uint32 (4 bytes each instead of ~36 for a tuple of ints).

    Duck-types the ``tuple[int, ...]`` the core expects: ``len``, iteration,
    indexing, and ``+`` with a tuple (``Request.all_token_ids``).
    """

    __slots__ = ()

    def __new__(cls, values=()):
        return super().__new__(cls, "I", values)

    def __add__(self, other):  # prompt + tuple(outputs)
        out = TokenIds(self)
        out.extend(other)
        return out

    def __eq__(self, other):
        if isinstance(other, (tuple, list)):
            return tuple(self) == tuple(other)
        return super().__eq__(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"TokenIds({list(self)!r})"
