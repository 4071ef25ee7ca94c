"""A Stage holds only its layers and handles stale calls and rollbacks by position."""
import pytest
import torch

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
    h, drafts = stage.forward("s", 0, 0, [5, 6, 7])
    assert h.shape == (1, 3, 64) and len(drafts) == 1
    stage.rollback("s", 1)
    assert stage.forward("s", 0, 3, [8]) == (None, None)       # older epoch
    assert stage.forward("s", 1, 3, None) == (None, None)       # its input was skipped upstream
    assert stage.forward("other", 0, 4, [8]) == (None, None)    # sequence not held (released)
    stats = stage.release("s", keep=3)
    assert stats["calls"] == 1 and stats["skipped"] == 2


def test_a_call_at_pos_drops_later_kv_entries(tiny_model_dir):
    """Rollback by position: after dropping, the stage computes what it would have from scratch."""
    stage = Stage(tiny_model_dir, 0, 4, index=0, num_stages=2)
    stage.forward("a", 0, 0, [5, 6, 7])
    stage.forward("a", 0, 3, [99])          # a draft that will be rejected
    stage.forward("a", 0, 4, [98])
    h_rolled, d_rolled = stage.forward("a", 1, 3, [8])
    stage.forward("b", 0, 0, [5, 6, 7])
    h_plain, d_plain = stage.forward("b", 0, 3, [8])
    assert torch.equal(h_rolled, h_plain) and d_rolled == d_plain
    assert stage.release("a", keep=4)["stale_s"] > 0


def test_a_gap_in_positions_is_an_error(tiny_model_dir):
    stage = Stage(tiny_model_dir, 0, 4, index=0, num_stages=2)
    stage.forward("s", 0, 0, [5, 6])
    with pytest.raises(RuntimeError, match="position 5"):
        stage.forward("s", 0, 5, [7])
