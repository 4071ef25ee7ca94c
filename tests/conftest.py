"""Shared fixtures: a tiny random Llama with a word-level tokenizer, transformers'
own greedy output as the reference, a Ray cluster for the session, and the real
default model (tests marked real_model)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def build_tiny_model(path, *, layers: int = 8, seed: int = 0, tie: bool = False, init_scale: float = 0.02) -> None:
    """A random Llama (hidden 64) with a 256-word tokenizer and a chat template; a larger
    init_scale makes its next-token distributions more peaked."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, initializer_range=init_scale, bos_token_id=1, eos_token_id=TINY_EOS, pad_token_id=TINY_EOS)
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


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def ray_cluster_nodes(log_dir: Path, node_args: list[list[str]], up=lambda: True, timeout_s: float = 120):
    """A real multi-node Ray cluster on this machine: `ray start --head --block` with node_args[0],
    then one `ray start --address --block` per further entry. Yields (GCS address, env).

    Stopped by signalling the `ray start --block` processes started here, not with `ray stop`,
    which would kill every Ray cluster of this user on the machine."""
    import psutil

    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, metrics = free_ports(2)
    address = f"127.0.0.1:{gcs}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # its own temp dir (short: Ray's socket paths): other ray.init() calls on this machine
    # look for a `ray start` cluster in /tmp/ray and must not find and join this one
    temp_dir = tempfile.mkdtemp(prefix="ppsd-ray-")
    procs, pids, logs = [], set(), []
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--disable-usage-stats"]
    try:
        for i, args in enumerate(node_args):
            log = log_dir / f"ray-start-{i}.log"
            logs.append(log)
            where = (["--head", "--port", str(gcs), "--metrics-export-port", str(metrics), "--temp-dir", temp_dir]
                     if i == 0 else ["--address", address])
            if i == 0 and "--include-dashboard" not in args:
                where += ["--include-dashboard", "false"]
            with open(log, "wb") as out:
                procs.append(subprocess.Popen([ray_bin, "start", *where, *common, *args], env=env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.time() + timeout_s
            while not (i > 0 or up()) or not _nodes_alive(address, env, i + 1):
                assert procs[-1].poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, f"ray start: node {i} not up\n" + log.read_text()[-3000:]
                time.sleep(1)
        yield address, env
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(2)
        for pid in pids:  # anything left of this cluster, by pid
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _nodes_alive(address: str, env: dict, n: int) -> bool:
    """Whether the cluster at address has n live nodes (asked from a separate process)."""
    code = f"import ray; ray.init(address='{address}', log_to_driver=False); print(sum(x['Alive'] for x in ray.nodes()))"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]
