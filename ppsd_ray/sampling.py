"""How a token is chosen (`propose`, on stage 1's exit head) and accepted (`verify`, on the
last stage's LM head). One rule for every mode and transport.

Greedy (temperature 0): the draft is the exit head's argmax, the verified token the
full model's argmax; a draft is accepted when they are equal.

Sampling: the draft x is drawn from the exit head's processed distribution q
(temperature, top-k, top-p), and q travels with it. The verifier accepts x with
probability min(1, p(x) / q(x)), p being the full model's processed distribution;
on a rejection it draws from normalize(max(0, p - q)). The committed tokens are
then distributed exactly as sampling from the full model (Leviathan et al. 2023).

Randomness is keyed, never global: every draw uses a generator seeded from (request
seed, position, epoch, purpose), so the same seed gives the same tokens on the same
pipeline whatever the timing, and a stale call that gets skipped changes nothing.
"""
from __future__ import annotations

import torch

from .protocol import Sampling

_DRAFT, _ACCEPT, _DRAW = 0, 1, 2


def _generator(s: Sampling, pos: int, epoch: int, purpose: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash((s.seed, pos, epoch, purpose)) & (2**63 - 1))  # int tuples hash the same everywhere
    return g


def processed(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (float32, one row per position)."""
    logits = logits.float() / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= s.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _draw(probs: torch.Tensor, g: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=g))


def propose(logits: torch.Tensor, s: Sampling, pos: int, epoch: int,
            vocab: torch.Tensor | None = None) -> tuple[int, tuple[torch.Tensor, torch.Tensor] | None]:
    """A draft for position `pos` from one row of exit-head logits (over `vocab` ids when the
    head has a draft vocabulary). Returns (token, (ids, probs) of q's support or None if greedy)."""
    if s.greedy:
        i = int(logits.argmax())
        return (int(vocab[i]) if vocab is not None else i), None
    q = processed(logits, s)
    i = _draw(q, _generator(s, pos, epoch, _DRAFT))
    support = q.nonzero().squeeze(-1)
    ids = vocab[support] if vocab is not None else support
    return (int(vocab[i]) if vocab is not None else i), (ids, q[support])


def verify(logits: torch.Tensor, first_pos: int, drafts: list[int],
           dists: list[tuple[torch.Tensor, torch.Tensor]] | None, s: Sampling, epoch: int
           ) -> tuple[list[int], int, list | None]:
    """Rows of full-model logits for the tokens at first_pos, first_pos + 1, ...; drafts[i]
    was proposed for row i. Returns (committed tokens: the accepted drafts then one token
    drawn from the model, accepted count, per committed token (logprob, top alternatives)
    if asked)."""
    tokens: list[int] = []
    accepted = 0
    for i in range(logits.shape[0]):
        pos = first_pos + i
        if s.greedy:
            token = int(logits[i].argmax())
            ok = i < len(drafts) and drafts[i] == token
        else:
            p = processed(logits[i], s)
            if i < len(drafts):
                ids, q_probs = dists[i]
                q = torch.zeros_like(p).index_put_((ids,), q_probs.float())
                u = torch.rand(1, generator=_generator(s, pos, epoch, _ACCEPT)).item()
                d = drafts[i]
                ok = u * float(q[d]) < float(p[d])
                if ok:
                    token = d
                else:
                    residual = (p - q).clamp_(min=0)
                    token = _draw(residual if residual.sum() > 0 else p, _generator(s, pos, epoch, _DRAW))
            else:
                ok = False
                token = _draw(p, _generator(s, pos, epoch, _DRAW))
        tokens.append(token)
        if not ok:
            break
        accepted += 1
    return tokens, accepted, (_logprobs(logits[: len(tokens)], tokens, s.logprobs)
                              if s.logprobs is not None else None)


def _logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list:
    """The full model's own log-probabilities (before temperature): the chosen token's and the top ones."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for row, token in zip(logp, tokens):
        alts = torch.topk(row, top) if top else None
        out.append((float(row[token]), tuple((int(i), float(v)) for v, i in zip(*alts)) if top else ()))
    return out
