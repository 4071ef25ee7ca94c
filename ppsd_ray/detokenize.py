"""Token ids to text as they are committed: the one streaming detokeniser (cli and serve)."""
from __future__ import annotations

from typing import Sequence


class StreamDetokenizer:
    """Feed token ids, get the new text. Text is held back while it could still change:
    while the decoded text ends in a half-decoded character (U+FFFD: the rest of its bytes
    are in tokens not yet seen) and while its end could be the start of a stop string.
    When a stop string appears, the text ends just before it and `stopped` turns True;
    tokens fed after that add nothing.

    Each step decodes the whole sequence (special tokens skipped) so that the text is
    exactly tokenizer.decode(all ids); at 2k tokens that is well under a millisecond,
    small against one decoding step."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError("stop: a stop string must not be empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.text = ""  # everything returned so far
        self.decoded_length = 0  # of the whole text decoded so far, shown or held back
        self.stopped = False

    def feed(self, token_id: int) -> str:
        """The text that token_id makes safe to show; often "" while it waits."""
        self.token_ids.append(token_id)
        if self.stopped:
            return ""
        full = self._decode()
        if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            return ""
        return self._emit(full, final=False)

    def finish(self) -> str:
        """The rest of the text once no more tokens come (what was held back)."""
        if self.stopped:
            return ""
        return self._emit(self._decode(), final=True)

    def _decode(self) -> str:
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        self.decoded_length = len(full)
        return full

    def _emit(self, full: str, final: bool) -> str:
        start = len(self.text)
        cut = min((i for i in (full.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(full)
        else:
            end = len(full) - self._partial_stop(full, start)
        new = full[start:end]
        self.text += new
        return new

    def _partial_stop(self, full: str, start: int) -> int:
        """Length of the longest end of full[start:] that begins some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full) - start), longest, -1):
                if full.endswith(s[:k]):
                    longest = k
                    break
        return longest
