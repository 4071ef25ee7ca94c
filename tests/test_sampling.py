"""Lossless speculative sampling: what ppsd and eesd commit is distributed exactly as sampling
from the full model (temperature, top-k, top-p applied), seeded per request, greedy unchanged.

Distributions are compared by total variation against the noise threshold: the 99.9th
percentile of the TV distance between the exact distribution and N exact samples from it."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import save_tiny_tokenizer
from ppsd_ray.config import GenerationConfig
from ppsd_ray.protocol import Sampling
from ppsd_ray.sampling import processed, propose, verify
from ppsd_ray.schedule import RequestStats
from test_schedule import local_decoder


def tv_noise(p: np.ndarray, n: int, trials: int = 400, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    return float(np.quantile([0.5 * np.abs(rng.multinomial(n, p) / n - p).sum() for _ in range(trials)], 0.999))


def tv(counts: dict, p: dict, n: int) -> float:
    keys = set(counts) | set(p)
    return 0.5 * sum(abs(counts.get(k, 0) / n - p.get(k, 0.0)) for k in keys)


def test_processed_applies_temperature_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    p = processed(logits, Sampling(temperature=0.5))
    assert torch.allclose(p, torch.softmax(logits / 0.5, -1))
    assert (processed(logits, Sampling(temperature=1.0, top_k=2))[0, 2:] == 0).all()
    full = torch.softmax(logits, -1)[0]  # 0.61, 0.22, 0.14, ...: top_p 0.8 keeps the smallest set reaching 0.8
    kept = processed(logits, Sampling(temperature=1.0, top_p=0.8))[0]
    assert (kept[:3] > 0).all() and (kept[3:] == 0).all() and kept.sum().item() == pytest.approx(1.0)
    assert (processed(logits, Sampling(temperature=1.0, top_p=0.5))[0, 1:] == 0).all()  # the first always stays
    assert full[0] > 0.5


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_verifier_output_is_distributed_as_the_full_model(top_p):
    """A draft from q, accepted with min(1, p/q), else a draw from the residual: the committed
    token is distributed as p, for q far from p and for q close to it."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 12, generator=g) * 2
    n = 6000
    accepted = 0
    for draft_logits in (torch.randn(1, 12, generator=g) * 2, target + 0.3 * torch.randn(1, 12, generator=g)):
        counts: dict = {}
        for seed in range(n):
            s = Sampling(temperature=0.8, top_p=top_p, seed=seed)
            token, dist = propose(draft_logits[0], s, pos=5, epoch=0)
            tokens, acc, _ = verify(target, 5, [token], [dist], s, epoch=0)
            counts[tokens[0]] = counts.get(tokens[0], 0) + 1
            accepted += acc
        p = processed(target, Sampling(temperature=0.8, top_p=top_p))[0].numpy()
        assert tv(counts, dict(enumerate(p)), n) < tv_noise(p, n)
    assert 0 < accepted < 2 * n  # both branches taken


def test_same_seed_same_tokens_and_no_global_rng(tiny_model_dir):
    decoder = local_decoder(tiny_model_dir, 2, eos_token_ids=[2])
    gen = GenerationConfig(mode="ppsd", max_new_tokens=20, temperature=1.0, seed=7, stop_on_eos=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = list(decoder.decode("a", [3, 5, 78], gen, RequestStats()))
    assert torch.equal(torch.get_rng_state(), before)  # the global generator was never drawn from
    b = list(decoder.decode("b", [3, 5, 78], gen, RequestStats()))
    c = list(decoder.decode("c", [3, 5, 78], gen.model_copy(update={"seed": 8}), RequestStats()))
    assert a == b and a != c


# ---- end to end: the joint distribution of the first tokens, tiny model


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """A tiny random Llama whose next-token distributions are peaked (large weights), so that a
    few thousand samples resolve the joint distribution of three tokens; its layers after the
    second write little into the residual stream, so early exits agree with the model often,
    but not always."""
    from transformers import AutoModelForCausalLM, GenerationConfig as HFGenerationConfig, LlamaConfig

    path = tmp_path_factory.mktemp("peaked")
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=1.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers[2:]:
            layer.mlp.down_proj.weight.mul_(0.1)
            layer.self_attn.o_proj.weight.mul_(0.1)
    model.generation_config = HFGenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def exact_joint(model_dir, prompt, s: Sampling, depth: int) -> dict:
    """P(first `depth` tokens) under the full model's processed distribution, enumerated."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = {(): 1.0}
    for _ in range(depth):
        nxt = {}
        for prefix, prob in out.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1:]
            p = processed(logits, s)[0]
            for t in p.nonzero().squeeze(-1).tolist():
                nxt[prefix + (t,)] = prob * float(p[t])
        out = {k: v for k, v in nxt.items() if v > 1e-9}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("k,mode,temperature", [(2, "ppsd", 0.7), (3, "ppsd", 1.0), (2, "eesd", 1.0)])
def test_ppsd_and_eesd_sample_the_full_models_joint_distribution(peaked_model_dir, k, mode, temperature):
    """Each way of drafting at one temperature (the temperature only reshapes the distribution
    the one sampler and verifier work on): 1000 draws of the first three tokens."""
    prompt, depth, n = [3, 5, 78, 7], 3, 1000
    s = Sampling(temperature=temperature, top_p=0.9)
    exact = exact_joint(peaked_model_dir, prompt, s, depth)
    decoder = local_decoder(peaked_model_dir, k, eos_token_ids=[2])
    counts: dict = {}
    drafted = accepted = 0
    for seed in range(n):
        gen = GenerationConfig(mode=mode, gamma=2, max_new_tokens=depth, temperature=temperature, top_p=0.9,
                               seed=seed, stop_on_eos=False)
        stats = RequestStats()
        key = tuple(decoder.decode(f"s{seed}", prompt, gen, stats))
        counts[key] = counts.get(key, 0) + 1
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0 < accepted < drafted  # the third token went through draft checks, both ways
    assert tv(counts, exact, n) < tv_noise(list(exact.values()), n), tv(counts, exact, n)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("k,mode,temperature", [(2, "ppsd", 0.7)])
def test_real_model_samples_its_own_joint_distribution(real_model_dir, k, mode, temperature):
    """The first two tokens after a short raw prompt: the second is verified against a draft.
    The default mode and K on the real model; every way of drafting: the peaked tiny model above."""
    from ppsd_ray.model import encode_prompt, load_tokenizer

    prompt = encode_prompt(load_tokenizer(real_model_dir), "The capital of France is", raw=True)
    depth, n = 2, 150
    s = Sampling(temperature=temperature, top_p=0.9)
    exact = exact_joint(real_model_dir, prompt, s, depth)
    decoder = local_decoder(real_model_dir, k)
    counts: dict = {}
    for seed in range(n):
        gen = GenerationConfig(mode=mode, gamma=2, max_new_tokens=depth, temperature=temperature, top_p=0.9,
                               seed=seed, stop_on_eos=False)
        key = tuple(decoder.decode(f"s{seed}", prompt, gen, RequestStats()))
        counts[key] = counts.get(key, 0) + 1
    assert tv(counts, exact, n) < tv_noise(list(exact.values()), n), (counts, exact)
