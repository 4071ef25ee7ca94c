"""The real SmolLM2-135M-Instruct: `ppsd generate --json --mode ppsd` equals transformers' greedy output."""
import json

import pytest
import torch

from ppsd_ray.model import encode_prompt, load_tokenizer
from test_cli import ppsd

pytestmark = pytest.mark.real_model

PROMPTS = ["Write a Python function that checks whether a number is prime.",
           "Explain why the sky is blue in three sentences."]


@pytest.fixture(scope="module")
def reference(real_model_dir):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(real_model_dir)
    out = {}
    for p in PROMPTS:
        ids = encode_prompt(tokenizer, p)
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=48)
        out[p] = gen[0, len(ids):].tolist()
    return out


@pytest.mark.parametrize("k", [2, 4])  # 4: two middle stages; 3 stages run on the tiny model
def test_ppsd_on_the_default_model_is_lossless(real_model_dir, reference, tmp_path, k):
    file = tmp_path / "p.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = ppsd("generate", "--prompts-file", file, "--json", "--mode", "ppsd", "--stages", k,
               "--max-new-tokens", 48, timeout=600)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        obj = json.loads(line)
        assert obj["token_ids"] == reference[obj["prompt"]]
        assert obj["stats"]["drafted"] > 0
