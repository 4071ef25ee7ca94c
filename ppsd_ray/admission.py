"""Admission: which requests decode now and which wait, so that a pipeline's memory stays bounded.

A request is admitted when a sequence slot is free (at most `max_seqs` decode at once, their
calls batched into each stage step) and its positions fit the KV budget: it reserves its
prompt plus max_new_tokens positions for its whole life, so the caches the stages hold
together never outgrow `max_tokens` positions whatever the requests do. Requests wait in
arrival order; a request that could never fit is refused at once.
"""
from __future__ import annotations

import threading


class Admission:
    def __init__(self, max_seqs: int, max_tokens: int):
        self.max_seqs, self.max_tokens = max_seqs, max_tokens
        self.seqs = self.tokens = 0
        self._cond = threading.Condition()
        self._queue: list[Ticket] = []  # the waiting requests, oldest first

    def join(self, tokens: int) -> "Ticket":
        """Joins the queue for a slot and `tokens` positions."""
        if tokens > self.max_tokens:
            raise ValueError(f"kv_budget_gb: a request of {tokens} positions exceeds the budget of "
                             f"{self.max_tokens} positions")
        ticket = Ticket(tokens)
        with self._cond:
            self._queue.append(ticket)
        return ticket

    def wait(self, ticket: "Ticket", timeout: float) -> bool:
        """Waits up to `timeout` s for the ticket's turn; True once admitted (then keep it until release)."""
        with self._cond:
            if self._cond.wait_for(lambda: self._fits(ticket), timeout):
                self._queue.remove(ticket)
                self.seqs += 1
                self.tokens += ticket.tokens
                self._cond.notify_all()
                return True
            return False

    def leave(self, ticket: "Ticket") -> None:
        """A ticket given up before its turn (its request was cancelled)."""
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _fits(self, ticket: "Ticket") -> bool:
        return (self._queue[0] is ticket and self.seqs < self.max_seqs
                and self.tokens + ticket.tokens <= self.max_tokens)

    def release(self, tokens: int) -> None:
        with self._cond:
            self.seqs -= 1
            self.tokens -= tokens
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._queue)


class Ticket:
    """One waiting request's place in the queue."""

    def __init__(self, tokens: int):
        self.tokens = tokens
