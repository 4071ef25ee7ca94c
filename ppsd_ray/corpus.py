"""Text already on this machine, for teacher-forced distillation data (ppsd_ray/teacher.py).

Sources (nothing from a model or dataset hub; licences in docs/heads.md):

- `stdlib`: the Python standard library's own sources (`sysconfig.get_paths()['stdlib']`,
  the `.py` files outside site-packages and test directories; PSF licence).
- `docs`: the standard library's docstrings (module, class and function docstrings, read with
  `ast` from the same files, never imported; PSF licence), one document per module.
- `man`: the English man pages under /usr/share/man/man1..9 (gzip roff, turned into plain text
  here; each page under its package's licence, mostly GPL/BSD/MIT-style documentation licences).
- `readmes`: the long descriptions (README) in the METADATA of installed Python packages whose
  licence is permissive (MIT, BSD, Apache, PSF, ISC, Zlib, 0BSD, Unlicense); others are skipped.
- `text:PATH`: your own text: a file, or a directory's files (sorted); its licence is yours to check.

Selection is deterministic: a source's documents are ordered by a seeded hash of their names,
each is tokenized and cut into windows of `chunk_tokens` tokens, and `chunks` yields them in
that order. A chunk is either a chat (a user question naming the document and the window as the
assistant's answer: the positions look like assistant turns) or plain text.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.metadata
import inspect
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .model import encode_chat

TEXT_SOURCES = ("stdlib", "docs", "man", "readmes")  # and text:PATH
MAN_ROOT = Path("/usr/share/man")
PERMISSIVE = ("mit", "bsd", "apache", "psf", "python software foundation", "isc", "zlib", "unlicense",
              "public domain", "0bsd")
COPYLEFT = ("gpl", "mpl", "mozilla", "epl", "eclipse", "cddl", "proprietary", "commercial", "non-commercial",
            "cc-by-nc", "sspl", "busl")
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    source: str
    name: str        # a path relative to its root, a module, a man page or a package name
    path: str        # where it is read from


@dataclass(frozen=True)
class Chunk:
    source: str
    index: int       # its place among its source's chunks (what the data job's manifest records)
    name: str
    ids: tuple[int, ...]
    start: int       # positions start..len(ids)-2 are kept: each predicts ids[t + 1], a window token


def check_source(source: str) -> str:
    if source in TEXT_SOURCES:
        return source
    if source.startswith("text:"):
        if not Path(source[5:]).expanduser().exists():
            raise ValueError(f"sources: {source}: no such file or directory")
        return source
    raise ValueError(f"sources: unknown source {source!r}; one of {', '.join(TEXT_SOURCES)}, answers, text:PATH")


def documents(source: str) -> list[Document]:
    """A source's documents, sorted by name."""
    if source in ("stdlib", "docs"):
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test_"))
            for f in sorted(filenames):
                if f.endswith(".py") and not f.startswith("test_"):
                    p = Path(dirpath) / f
                    docs.append(Document(source, str(p.relative_to(root)), str(p)))
        return sorted(docs, key=lambda d: d.name)
    if source == "man":
        docs = [Document(source, p.name[:-3], str(p)) for d in sorted(MAN_ROOT.glob("man[1-9]"))
                for p in sorted(d.glob("*.gz")) if not p.is_symlink()]
        return sorted(docs, key=lambda d: d.name)
    if source == "readmes":
        seen: dict[str, Document] = {}
        for dist in importlib.metadata.distributions():
            name = (dist.metadata.get("Name") or "").lower()
            if name and name not in seen and permissive(dist.metadata) and _description(dist.metadata).strip():
                path = getattr(dist, "_path", None)  # the .dist-info directory
                if path is not None and (Path(path) / "METADATA").is_file():
                    seen[name] = Document(source, name, str(Path(path) / "METADATA"))
        return [seen[k] for k in sorted(seen)]
    if source.startswith("text:"):
        root = Path(source[5:]).expanduser()
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        return [Document(source, str(p.relative_to(root)) if p != root else p.name, str(p)) for p in files]
    raise ValueError(check_source(source))


def permissive(meta) -> bool:
    """Whether a package's METADATA names a permissive licence (and no copyleft one)."""
    text = " ".join([meta.get("License-Expression") or "", (meta.get("License") or "").split("\n")[0],
                     *[c for c in meta.get_all("Classifier") or [] if c.startswith("License")]]).lower()
    if any(w in text for w in COPYLEFT):
        return False
    return any(w in text for w in PERMISSIVE)


def _description(meta) -> str:
    return meta.get_payload() or meta.get("Description") or ""


def read_text(doc: Document) -> str:
    if doc.source == "stdlib":
        return Path(doc.path).read_text(encoding="utf-8", errors="replace")
    if doc.source == "docs":
        return docstrings(Path(doc.path).read_text(encoding="utf-8", errors="replace"), doc.name)
    if doc.source == "man":
        with gzip.open(doc.path, "rt", encoding="utf-8", errors="replace") as f:
            return roff_to_text(f.read())
    if doc.source == "readmes":
        return _description(importlib.metadata.PathDistribution(Path(doc.path).parent).metadata)
    return Path(doc.path).read_text(encoding="utf-8", errors="replace")


def docstrings(source: str, filename: str) -> str:
    """A module's docstrings as text: each under its qualified name and signature."""
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return ""
    module = filename[:-3].replace(os.sep, ".").removesuffix(".__init__")
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    sig = "" if isinstance(child, ast.ClassDef) else f"({ast.unparse(child.args)})"
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    out.append(f"{kind} {name}{sig}\n{inspect.cleandoc(doc)}")
                visit(child, name)

    doc = ast.get_docstring(tree)
    if doc:
        out.append(f"module {module}\n{inspect.cleandoc(doc)}")
    visit(tree, module)
    return "\n\n".join(out)


_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_NAMED = {"aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "em": "--", "en": "-", "bu": "*",
          "hy": "-", "mi": "-", "co": "(c)", "rg": "(R)", "tm": "(TM)", "ga": "`", "ha": "^", "ti": "~"}
_NAMED_RE = re.compile(r"\\(\[([^\]]*)\]|\((..))")
_ESCAPES = [("\\-", "-"), ("\\e", "\\"), ("\\&", ""), ("\\ ", " "), ("\\|", ""), ("\\^", ""), ("\\/", ""),
            ("\\,", ""), ("\\:", ""), ("\\~", " "), ("\\c", ""), ("\\0", " ")]
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
_WORDS = {"B", "I", "SM", "SB", "UR", "MT", "OP"}
_BREAKS = {"PP", "LP", "P", "sp", "TP", "IP", "br", "HP", "RS", "RE", "TH", "UE", "ME", "PD", "ft", "ta", "ll", "ti",
           "in", "ad", "na", "hy", "nh", "ne", "fam", "mso", "nf", "fi", "EX", "EE", "SH", "SS", "TQ"}


def roff_to_text(roff: str) -> str:
    """Man-page roff to plain text: text lines filled into paragraphs (kept as they are in no-fill
    blocks), macros dropped with their text kept, font changes and common escapes removed. Rough,
    but the words, options and examples survive."""
    out: list[str] = []
    para: list[str] = []
    fill = True

    def flush(blank=False):
        if para:
            out.append(" ".join(para))
            para.clear()
        if blank and out and out[-1] != "":
            out.append("")

    for line in roff.splitlines():
        if line.startswith(('.\\"', "'\\\"", ".\\}", ".ig", ".de", ".if", ".ie", ".el", ".nr", ".ds", ".so", ".\\\"")):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            args = re.findall(r'"[^"]*"|\S+', rest)
            args = [a.strip('"') for a in args]
            if macro in _ALTERNATING:
                line = "".join(args)
            elif macro in _WORDS:
                line = " ".join(args)
            elif macro in _BREAKS:
                flush(blank=macro in ("PP", "LP", "P", "sp", "SH", "SS", "TP", "IP", "HP"))
                if macro in ("nf", "EX"):
                    fill = False
                elif macro in ("fi", "EE"):
                    fill = True
                if macro == "SH":
                    out.append(" ".join(args).upper())
                elif macro in ("SS", "IP") and args:
                    out.append(args[0])
                continue
            else:
                continue
        line = _FONT.sub("", line)
        line = _NAMED_RE.sub(lambda m: _NAMED.get(m.group(2) or m.group(3), ""), line)
        for a, b in _ESCAPES:
            line = line.replace(a, b)
        if fill:
            if line.strip():
                para.append(line.strip())
            else:
                flush(blank=True)
        else:
            flush()
            out.append(line)
    flush()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


QUESTIONS = {
    "stdlib": "Show me the Python standard library file {name}.",
    "docs": "Explain the documented API of the Python module in {name}.",
    "man": "Show me the manual page of {name}.",
    "readmes": "Describe the Python package {name}.",
    "text": "Show me {name}.",
}


def ordered(docs: list[Document], seed: int) -> list[Document]:
    """A deterministic order that does not depend on how the listing came out."""
    def rank(d):
        return hashlib.sha256(f"{seed}/{d.source}/{d.name}".encode()).hexdigest()
    return sorted(docs, key=rank)


def corpus_fingerprint(docs: list[Document]) -> str:
    """Names and sizes of a source's documents: a re-run on a changed machine is refused."""
    h = hashlib.sha256()
    for d in docs:
        size = os.path.getsize(d.path) if os.path.exists(d.path) else 0
        h.update(f"{d.name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def chunks(tokenizer, source: str, seed: int = 0, chunk_tokens: int = 512, chat: bool = True,
           min_tokens: int = 16, docs: list[Document] | None = None) -> Iterator[Chunk]:
    """A source's chunks in their deterministic order (lazily: a document is read and tokenized
    only when its chunks are reached)."""
    docs = ordered(documents(source) if docs is None else docs, seed)
    question = QUESTIONS["text" if source.startswith("text:") else source]
    n = 0
    for doc in docs:
        text = read_text(doc)
        if not text.strip():
            continue
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        for w in range(0, len(ids), chunk_tokens):
            window = ids[w: w + chunk_tokens]
            if len(window) < min_tokens:
                continue
            part = f" (part {w // chunk_tokens + 1})" if len(ids) > chunk_tokens else ""
            if chat and tokenizer.chat_template:
                prefix = encode_chat(tokenizer, [{"role": "user", "content": question.format(name=doc.name) + part}])
            else:
                prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            if not prefix:  # plain text without a BOS: the first token is context only
                prefix, window = window[:1], window[1:]
            yield Chunk(source, n, f"{doc.name}{part}", tuple(prefix + window), len(prefix) - 1)
            n += 1
