"""Admission: which requests decode now and which wait, so that a pipeline's memory stays bounded.

A request is admitted when a sequence slot is free (at most `max_seqs` decode at once, their
calls batched into each stage step) and its positions fit the KV budget: it reserves its
prompt plus max_new_tokens positions for its whole life, so the caches the stages hold
together never outgrow `max_tokens` positions whatever the requests do. Requests wait in
arrival order; a request that could never fit is refused at once.
"""
from __future__ import annotations

import threading
from typing import Callable


class Admission:
    def __init__(self, max_seqs: int, max_tokens: int):
        self.max_seqs, self.max_tokens = max_seqs, max_tokens
        self.seqs = self.tokens = 0
        self._cond = threading.Condition()
        self._queue: list[object] = []  # tickets of the waiting requests, oldest first

    def acquire(self, tokens: int, cancelled: Callable[[], bool] = lambda: False) -> bool:
        """Waits for a slot and `tokens` positions; False if cancelled while waiting."""
        if tokens > self.max_tokens:
            raise ValueError(f"kv_budget_gb: a request of {tokens} positions exceeds the budget of "
                             f"{self.max_tokens} positions")
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket and self.seqs < self.max_seqs
                           and self.tokens + tokens <= self.max_tokens):
                    if cancelled():
                        return False
                    self._cond.wait(timeout=0.5)
                self.seqs += 1
                self.tokens += tokens
                return True
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def release(self, tokens: int) -> None:
        with self._cond:
            self.seqs -= 1
            self.tokens -= tokens
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._queue)
