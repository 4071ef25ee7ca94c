"""A Stage holds only its layers and handles stale calls and rollbacks by position."""
import pytest
import torch

from ppsd_ray.protocol import Verdict, Work
from ppsd_ray.stage import Stage


def test_stage_loads_only_its_layer_range(tiny_model_dir):
    middle = Stage(tiny_model_dir, 2, 5, index=1, num_stages=3)
    assert len(middle.body.layers) == 3
    assert middle.body.embed_tokens is None and middle.lm_head is None and middle.exit_head is None
    from safetensors import safe_open
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        want = f.get_tensor("model.layers.3.mlp.up_proj.weight")
    assert torch.equal(middle.body.layers[1].mlp.up_proj.weight, want)
    first = Stage(tiny_model_dir, 0, 2, index=0, num_stages=3)
    assert first.exit_head is not None and first.body.embed_tokens is not None


def test_stale_calls_are_skipped_without_computing(tiny_model_dir):
    stage = Stage(tiny_model_dir, 0, 4, index=0, num_stages=2)
    hop = stage.forward(Work("s", 0, 0, (5, 6, 7), draft=True))
    assert hop.hidden.shape == (1, 3, 64) and len(hop.drafts) == 1
    stage.rollback("s", 1)
    assert stage.forward(Work("s", 0, 3, (8,))) is None            # older epoch
    assert stage.forward(Work("other", 0, 4, (8,))) is None        # sequence not held (released)
    last = Stage(tiny_model_dir, 4, 8, index=1, num_stages=2)
    assert last.forward(Work("s", 1, 3, (8,)), None) is None       # its input was skipped upstream
    report = stage.release("s", keep=3)
    assert report.calls == 1 and report.skipped == 1


def test_a_resumed_request_never_takes_a_draft_of_an_earlier_epoch(tiny_model_dir):
    """A request drafted (ppsd) up to a position, then a stage died and it resumed in a new
    epoch, as pp (under load): stage 1's call there has no token of its own, it waits for the
    one fed round. Taking its old draft instead changed served outputs (Serve, stage kills)."""
    stage = Stage(tiny_model_dir, 0, 4, index=0, num_stages=2)
    stage.forward(Work("s", 0, 0, (5, 6, 7)))
    hop = stage.forward(Work("s", 0, 3, (8,), draft=True))  # stage 1's own draft for position 4
    stage.forward(Work("s", 1, 0, (5, 6, 7)))  # resumed: the prompt again, then the committed token
    stage.forward(Work("s", 1, 3, (8,), feed=True))
    resumed = Work("s", 1, 4, None)
    assert stage.waits(resumed) and stage.forward(resumed) is None  # its token is still on its way
    assert stage.forward(resumed, Verdict("s", 1, 3, [hop.drafts[0] ^ 1], 0, 0)) is not None  # fed: it runs


def test_a_call_rolled_back_while_running_stops_between_layers(tiny_model_dir):
    stage = Stage(tiny_model_dir, 0, 4, index=0, num_stages=2)
    stage.forward(Work("s", 0, 0, (5, 6, 7), draft=True))
    layers_run = []

    def roll_back_after_layer_one(module, args):
        layers_run.append(module)
        if len(layers_run) == 1:
            stage.rollback("s", 1)

    stage.body.layers[0].register_forward_pre_hook(roll_back_after_layer_one)
    assert stage.forward(Work("s", 0, 3, (8,), draft=True)) is None
    assert layers_run == [stage.body.layers[0]]  # layers 1..3 never ran
    # the corrected call at the same position sees exactly what a fresh sequence would
    hop = stage.forward(Work("s", 1, 3, (9,), draft=True))
    fresh = Stage(tiny_model_dir, 0, 4, index=0, num_stages=2)
    fresh.forward(Work("f", 0, 0, (5, 6, 7)))
    want = fresh.forward(Work("f", 0, 3, (9,), draft=True))
    assert torch.equal(hop.hidden, want.hidden) and hop.drafts == want.drafts
    report = stage.release("s", keep=4)
    assert report.skipped == 1 and report.stale_s >= report.stopped_s > 0


def test_a_call_at_pos_drops_later_kv_entries(tiny_model_dir):
    """Rollback by position: after dropping, the stage computes what it would have from scratch."""
    stage = Stage(tiny_model_dir, 0, 4, index=0, num_stages=2)
    stage.forward(Work("a", 0, 0, (5, 6, 7)))
    stage.forward(Work("a", 0, 3, (99,)))          # a draft that will be rejected
    stage.forward(Work("a", 0, 4, (98,)))
    rolled = stage.forward(Work("a", 1, 3, (8,), draft=True))
    stage.forward(Work("b", 0, 0, (5, 6, 7)))
    plain = stage.forward(Work("b", 0, 3, (8,), draft=True))
    assert torch.equal(rolled.hidden, plain.hidden) and rolled.drafts == plain.drafts
    assert stage.release("a", keep=4).stale_s > 0
    assert stage.sequences() == ["b"]


def test_a_gap_in_positions_is_an_error(tiny_model_dir):
    stage = Stage(tiny_model_dir, 0, 4, index=0, num_stages=2)
    stage.forward(Work("s", 0, 0, (5, 6)))
    with pytest.raises(RuntimeError, match="position 5"):
        stage.forward(Work("s", 0, 5, (7,)))


def test_on_passing_thread_returns_raises_and_leaves_no_thread_behind():
    """The work runs on a thread of its own that has ended when the call returns (its OpenMP pool
    with it); the result and any exception come back to the caller."""
    import threading

    import pytest

    from ppsd_ray.kv import on_passing_thread

    ran = []
    assert on_passing_thread(lambda x: ran.append(threading.current_thread()) or x + 1, 41) == 42
    assert ran[0] is not threading.current_thread() and not ran[0].is_alive()
    with pytest.raises(KeyError, match="gone"):
        on_passing_thread(lambda: {}["gone"])
