"""A bad value fails before anything starts, with one message naming the field."""
import pytest
from pydantic import ValidationError

from ppsd_ray.config import GenerationConfig, PipelineConfig, describe
from ppsd_ray.plan import resolve


def message(**kwargs) -> str:
    with pytest.raises(ValidationError) as e:
        if "mode" in kwargs or "max_new_tokens" in kwargs or "gamma" in kwargs:
            GenerationConfig(**kwargs)
        else:
            PipelineConfig(**kwargs)
    return describe(e.value)


def test_bad_values_name_their_field(tiny_model_dir, tmp_path):
    assert message(model_dir=tiny_model_dir, stages=2, exit_layer=8).startswith("exit_layer:")
    assert message(model_dir=tiny_model_dir, stages=2, exit_layer=0).startswith("exit_layer:")
    assert message(model_dir=tiny_model_dir, stages=9).startswith("stages:")
    assert message(model_dir=tiny_model_dir, stages=0).startswith("stages:")
    assert message(model_dir=tmp_path / "nowhere").startswith("model_dir:")
    assert message(model_dir=tiny_model_dir, head="no-such-head.safetensors").startswith("head:")
    assert message(mode="fast").startswith("mode:")
    assert message(max_new_tokens=0).startswith("max_new_tokens:")
    assert message(gamma=0).startswith("gamma:")
    assert message(model_dir=tiny_model_dir, stages=2, in_process=True).startswith("in_process:")
    assert message(model_dir=tiny_model_dir, use_gpus=True, in_process=True).startswith("in_process:")


def test_layer_ranges_cover_the_model_once(tiny_model_dir):
    for k, e, want in [(1, None, [(0, 8)]), (2, None, [(0, 4), (4, 8)]), (3, 2, [(0, 2), (2, 5), (5, 8)]),
                       (4, 5, [(0, 5), (5, 6), (6, 7), (7, 8)])]:
        assert resolve(PipelineConfig(model_dir=tiny_model_dir, stages=k, exit_layer=e)).layer_ranges == want
