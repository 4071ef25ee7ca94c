"""The token loop, driven in-process: real Stages on a tiny Llama, and scripted fakes."""
import pytest

from conftest import hf_greedy
from ppsd_ray.config import GenerationConfig, PipelineConfig
from ppsd_ray.plan import resolve
import torch

from ppsd_ray.protocol import Hop, StageReport, Verdict
from ppsd_ray.sampling import verify
from ppsd_ray.schedule import Decoder, RequestStats
from ppsd_ray.stage import Stage
from ppsd_ray.transport import LocalPipe

PROMPTS = [[3, 5, 78, 7, 5, 195, 4, 3], [1, 40, 41, 42], [9]]
MODES = {1: ["ar"], 2: ["pp", "ppsd", "eesd"], 3: ["pp", "ppsd", "eesd"], 4: ["pp", "ppsd", "eesd"]}


def local_stages(model_dir, k, exit_layer=None, batched=True):
    plan = resolve(PipelineConfig(model_dir=model_dir, stages=k, exit_layer=exit_layer))
    return [Stage(model_dir, a, b, index=i, num_stages=k, exit_layer=plan.exit_layer, batched=batched)
            for i, (a, b) in enumerate(plan.layer_ranges)]


def local_decoder(model_dir, k, exit_layer=None, batched=True, **kw):
    return Decoder(LocalPipe(local_stages(model_dir, k, exit_layer, batched)), k, **kw)


def run(decoder, prompt, **gen):
    stats = RequestStats()
    out = list(decoder.decode("seq", prompt, GenerationConfig(**gen), stats))
    return out, stats


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_mode_equals_transformers_greedy(tiny_model_dir, k):
    decoder = local_decoder(tiny_model_dir, k, eos_token_ids=[2])
    for prompt in PROMPTS:
        want = hf_greedy(tiny_model_dir, prompt, 40, stop_on_eos=False)
        for mode in MODES[k]:
            for gamma in ([2, 5] if mode == "eesd" else [4]):
                got, stats = run(decoder, prompt, mode=mode, gamma=gamma, max_new_tokens=40, stop_on_eos=False)
                assert got == want, (k, mode, gamma, prompt)
                assert stats.new_tokens == 40


def test_stages_planned_for_one_sequence_run_each_row_with_the_1_row_kernel(tiny_model_dir):
    """concurrency 1 (batched=False): a lone token runs the 1-row kernels transformers uses (no
    padded tile), rows of several sequences each get that same product, and decoding stays
    lossless."""
    from ppsd_ray.kv import call_rows

    decoder = local_decoder(tiny_model_dir, 2, batched=False, eos_token_ids=[2])
    linears = [m for s in decoder.pipe.stages for m in s.body.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for m in linears[:4]:
        x = torch.randn(1, 6, m.in_features)
        alone = torch.cat([torch.nn.functional.linear(x[:, i:i + 1], m.weight, m.bias) for i in range(6)], dim=1)
        with call_rows([1] * 6):
            assert torch.equal(m(x), alone)
    for prompt in PROMPTS:
        want = hf_greedy(tiny_model_dir, prompt, 40, stop_on_eos=False)
        for mode in MODES[2]:
            assert run(decoder, prompt, mode=mode, max_new_tokens=40, stop_on_eos=False)[0] == want, (mode, prompt)


def test_speculation_is_exercised(tiny_model_dir):
    """The lossless test means something only if drafts are both accepted and rejected."""
    decoder = local_decoder(tiny_model_dir, 2, eos_token_ids=[2])
    _, stats = run(decoder, PROMPTS[0], mode="ppsd", max_new_tokens=40, stop_on_eos=False)
    assert 0 < stats.accepted < stats.drafted == 38  # every verified token but the last had a draft behind it
    assert stats.rollbacks == stats.drafted - stats.accepted
    assert all(s.stale_s > 0 for s in stats.stages)


def test_stops_at_eos_like_transformers(tiny_model_dir):
    decoder = local_decoder(tiny_model_dir, 2, eos_token_ids=[2])
    for prompt in PROMPTS:
        want = hf_greedy(tiny_model_dir, prompt, 60)
        for mode in ["pp", "ppsd", "eesd"]:
            assert run(decoder, prompt, mode=mode, max_new_tokens=60)[0] == want


class ScriptedStage:
    """A fake stage: stage 1 drafts `draft(p)` for position p, the last stage's model says
    `truth(p)` (one-hot logits through the real verifier); records every call so the
    schedule's messages can be checked."""

    def __init__(self, log, index, last, truth, draft):
        self.log, self.index, self.last, self.truth, self.draft = log, index, last, truth, draft

    def forward(self, work, hop=None):
        # stage 1's input: the call's tokens, its own draft (None), or a verdict fed round to it
        tokens = work.tokens if work.tokens is not None or not isinstance(hop, Verdict) else ("fed", *hop.tokens)
        self.log.append(("forward", self.index, work.epoch, work.pos, None if self.index else tokens))
        if self.index == 0:
            n = (len(work.tokens) if work.tokens else 1) + work.chain
            drafts = [self.draft(work.pos + i) for i in range(n - work.chain, n + work.draft)]
        else:
            n, drafts = hop.hidden.shape[1], hop.drafts
        if not self.last:
            return Hop(work, torch.zeros(1, n, 1), drafts)
        first = work.pos + n - work.verify + 1
        logits = torch.zeros(work.verify, 256)
        logits[range(work.verify), [self.truth(first + i) for i in range(work.verify)]] = 1.0
        tokens, accepted, _ = verify(logits, first, drafts, None, work.sampling, work.epoch)
        return Verdict(work.seq_id, work.epoch, work.pos, tokens, len(drafts), accepted)

    def rollback(self, seq_id, epoch):
        self.log.append(("rollback", self.index, epoch))

    def release(self, seq_id, keep, events=False):
        self.log.append(("release", self.index, keep))
        return StageReport(self.index)


def scripted(k, truth, draft):
    log = []
    stages = [ScriptedStage(log, i, i == k - 1, truth, draft) for i in range(k)]
    return log, Decoder(LocalPipe(stages), k, get=lambda verdict: log.append(("get", verdict.pos)) or verdict)


def test_rejected_draft_rolls_back_and_corrected_token_enters_stage_one():
    # truth: the token at position p is 100 + p; stage 1's draft is right except at position 6
    truth = lambda p: 99 + p
    draft = lambda p: 0 if p == 6 else 99 + p
    log, decoder = scripted(2, truth, draft)
    out, stats = run(decoder, [1, 2, 3], mode="ppsd", max_new_tokens=8)
    assert out == [102, 103, 104, 105, 106, 107, 108, 109]
    assert stats.rollbacks == 1 and stats.drafted == 6 and stats.accepted == 5
    rollbacks = [e for e in log if e[0] == "rollback"]
    assert rollbacks[:2] == [("rollback", 0, 1), ("rollback", 1, 1)]
    after = log[log.index(rollbacks[1]) + 1]
    # the verified token for position 6 (105, from position 5) enters stage 1 at 6, in the new epoch
    assert after == ("forward", 0, 1, 6, (105,))
    # the end of a request: calls still queued are made stale, then every stage releases
    assert rollbacks[2:] == [("rollback", 0, 2), ("rollback", 1, 2)]
    assert [e[2] for e in log if e[0] == "release"] == [3 + 8 - 1] * 2


def test_pp_keeps_one_token_in_the_pipe():
    log, decoder = scripted(3, lambda p: 7, lambda p: 7)
    run(decoder, [1], mode="pp", max_new_tokens=5)
    first_stage = [e[3] for e in log if e[0] == "forward" and e[1] == 0]
    assert first_stage == [0, 1, 2, 3, 4]
    assert [e[2] for e in log if e[0] == "rollback"] == [1, 1, 1]  # only the one that ends the request


def test_pp_feeds_each_token_from_the_last_stage_straight_to_stage_one():
    """pp: the next call goes out before the coordinator has the token it needs; stage 1 takes
    that token from the last stage's verdict, handed round to it, not from the coordinator."""
    truth = lambda p: 99 + p
    log, decoder = scripted(3, truth, truth)
    out, _ = run(decoder, [1, 2, 3], mode="pp", max_new_tokens=5)
    assert out == [102, 103, 104, 105, 106]
    calls = [(e[3], e[4]) for e in log if e[0] == "forward" and e[1] == 0]
    assert calls == [(0, (1, 2, 3)), (3, (102,)), (4, ("fed", 103)), (5, ("fed", 104)), (6, ("fed", 105))]
    order = [e for e in log if e[0] == "get" or e[:2] == ("forward", 0)]
    for p in (3, 4, 5):  # the call at p + 1 was sent before the verdict at p was read
        assert order.index(("get", p)) > next(i for i, e in enumerate(order) if e[0] == "forward" and e[3] == p + 1)


def test_ppsd_never_launches_past_max_new_tokens():
    log, decoder = scripted(4, lambda p: 7, lambda p: 7)
    out, stats = run(decoder, [1, 1], mode="ppsd", max_new_tokens=6)
    assert out == [7] * 6
    assert max(e[3] for e in log if e[0] == "forward") == 2 + 6 - 2


def test_decoder_reads_only_verdicts(tiny_model_dir):
    """Hidden states go stage to stage; the decoder's `get` only ever sees verdicts and reports."""
    seen = []

    def get(x):
        seen.append(x)
        return x

    decoder = local_decoder(tiny_model_dir, 3, get=get, eos_token_ids=[2])
    for mode in ["ppsd", "eesd", "pp"]:
        run(decoder, PROMPTS[0], mode=mode, max_new_tokens=10)
    assert seen and all(isinstance(x, (Verdict, StageReport)) for x in seen)


def test_mode_needs_matching_stage_count(tiny_model_dir):
    with pytest.raises(ValueError, match="mode"):
        run(local_decoder(tiny_model_dir, 2), [1], mode="ar")
    with pytest.raises(ValueError, match="mode"):
        run(local_decoder(tiny_model_dir, 1), [1], mode="ppsd")


class FailingPipe(LocalPipe):
    """A LocalPipe whose submit raises, as a dead stage would, on the calls `fails` says (counting
    the calls that decide tokens; a resume's replayed calls, verify 0, pass)."""

    def __init__(self, stages, fails):
        super().__init__(stages)
        self.fails, self.calls = fails, 0

    def submit(self, work):
        if not work.verify:
            return super().submit(work)
        self.calls += 1
        if self.fails(self.calls, work):
            raise RuntimeError(f"stage died under call {self.calls}")
        return super().submit(work)


class CountingRepair:
    generation = 0

    def __call__(self, error, generation):
        self.generation += 1


def test_a_request_survives_any_number_of_repairs_that_each_follow_progress(tiny_model_dir):
    """Five deaths, each after new tokens were committed: more than MAX_REPAIRS in all, and the
    output still equals the uninterrupted one."""
    from ppsd_ray.schedule import MAX_REPAIRS

    flaky = FailingPipe(local_stages(tiny_model_dir, 2), lambda n, work: n % 9 == 0 and n <= 45)
    decoder = Decoder(flaky, 2, repair=CountingRepair())
    out, stats = run(decoder, PROMPTS[0], mode="ppsd", max_new_tokens=40, stop_on_eos=False)
    assert out == hf_greedy(tiny_model_dir, PROMPTS[0], 40, stop_on_eos=False)
    assert stats.repairs == 5 > MAX_REPAIRS


def test_a_request_that_kills_a_stage_every_time_fails_after_max_repairs(tiny_model_dir):
    from ppsd_ray.schedule import MAX_REPAIRS

    repair = CountingRepair()
    poison = FailingPipe(local_stages(tiny_model_dir, 2), lambda n, work: n > 3)  # never again a token
    decoder = Decoder(poison, 2, repair=repair)
    with pytest.raises(RuntimeError, match="stage died"):
        run(decoder, PROMPTS[0], mode="ppsd", max_new_tokens=40, stop_on_eos=False)
    assert repair.generation == MAX_REPAIRS


def test_a_ppsd_request_started_under_load_runs_as_pp(tiny_model_dir):
    """may_draft says no (the pipeline is busy): the request drafts nothing, same tokens."""
    decoder = local_decoder(tiny_model_dir, 2, eos_token_ids=[2], may_draft=lambda: False)
    got, stats = run(decoder, PROMPTS[0], mode="ppsd", max_new_tokens=20, stop_on_eos=False)
    assert got == hf_greedy(tiny_model_dir, PROMPTS[0], 20, stop_on_eos=False)
    assert stats.drafted == 0 and not stats.speculated
    _, stats = run(local_decoder(tiny_model_dir, 2), PROMPTS[0], mode="ppsd", max_new_tokens=20, stop_on_eos=False)
    assert stats.drafted > 0 and stats.speculated
