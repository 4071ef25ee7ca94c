"""Shared fixtures: a tiny random Llama with a word-level tokenizer, transformers'
own greedy output as the reference, a Ray cluster for the session, and the real
default model (tests marked real_model)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test clusters need no token
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_EOS = 2
WORDS = ("the a of to and in is it that was for on are with as be at by this have from or one had not but "
         "what all were when we there can an your which their said if do will each about how up out them "
         "then she many some so these would other into has more her two like him see time could no make "
         "than first been its who now people my made over did down only way find use may water long little "
         "very after words called just where most know get through back much before go good new write our "
         "used me man too any day same right look think also around another came come work three word must "
         "because does part even place well such here take why things help put years different away again "
         "off went old number great tell men say small every found still between name should home big give "
         "air line set own under read last never us left end along while might next sound below saw "
         "something thought both few those always looked show large often together asked house world going "
         "want school important until form food keep children feet land side without boy once animals life "
         "enough took sometimes four head above kind began almost live page got earth need far hand high "
         "year mother light parts country father let night following picture being study second eyes soon "
         "times story boys since white days ever paper hard near sentence better best across during today "
         "others however sure means knew try told young miles sun ways thing whole hear example heard "
         "several change answer room sea against top turned learn point city play toward five using himself "
         "usually").split()


def save_tiny_tokenizer(path) -> None:
    """A 256-word tokenizer with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS[: 256 - len(specials)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> {% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|> {% endif %}")
    tokenizer.save_pretrained(path)


def save_tiny_model(path, config, seed: int = 0) -> None:
    """A random *ForCausalLM for `config` (transformers' own class) next to the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=TINY_EOS, pad_token_id=TINY_EOS)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)


def build_tiny_model(path, *, layers: int = 8, seed: int = 0, tie: bool = False) -> None:
    """A random Llama (hidden 64) with a 256-word tokenizer and a chat template."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=TINY_EOS, pad_token_id=TINY_EOS)
    save_tiny_model(path, config, seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(path)
    return path


def hf_greedy(model_dir, prompt_ids, max_new_tokens, stop_on_eos=True):
    """transformers' own greedy output: the reference every mode must equal."""
    from transformers import AutoModelForCausalLM

    model = _hf_models.get(str(model_dir))
    if model is None:
        model = _hf_models[str(model_dir)] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # no eos: generate runs to max_new_tokens with eos an ordinary token (min_new_tokens would ban it instead)
    kwargs = {} if stop_on_eos else {"eos_token_id": None}
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return out[0, len(prompt_ids):].tolist()


_hf_models: dict = {}


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # address="local": always a new cluster; never join one that `ray start` left in
    # /tmp/ray/ray_current_cluster (that file outlives its cluster)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def real_model_dir():
    from ppsd_ray.model import default_model_dir

    return default_model_dir()
