"""Build heads_train_stdlib.jsonl: more varied exit-head training prompts, from Python's own
standard library (code and documentation text that is on every machine, no download).

The hand-written heads_train.jsonl has 880 prompts from a few dozen templates and fillers;
a head trained on the answers to them fits them much better than the held-out validation
prompts (docs/heads.md). These prompts add variety: functions of the standard library to
explain, test, review or port, and its docstrings to summarise, translate, simplify or turn
into lists and questions. Validation prompts stay the hand-written held-out set.

    python -m ppsd_ray.data.build_stdlib_prompts             # writes next to this script
    python -m ppsd_ray.data.build_stdlib_prompts --count 1600 --out DIR

The seed is fixed; the output depends on the Python version's standard library (recorded
in each line's "source" field as module:function).
"""
import argparse
import ast
import io
import json
import random
import sysconfig
import textwrap
from pathlib import Path

SEED = 4321
HERE = Path(__file__).resolve().parent
SKIP = ("test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages", "__phello__")

CODE_TEMPLATES = [
    ("code", "Explain what this Python function does, step by step:\n\n```python\n{code}\n```"),
    ("code", "Write two short unit tests for this Python function and say what each one checks:\n\n```python\n{code}\n```"),
    ("code", "Review this Python function: is there anything you would change, and why?\n\n```python\n{code}\n```"),
    ("code", "Rewrite this Python function in JavaScript and explain the main differences:\n\n```python\n{code}\n```"),
    ("code", "Add comments to this Python function so that a beginner can follow it:\n\n```python\n{code}\n```"),
]
SPEC_TEMPLATES = [
    ("code", "Write a Python function `{name}` that does the following: {summary}"),
    ("code", "How would you implement `{name}` in Python? It should do this: {summary}"),
]
TEXT_TEMPLATES = [
    ("summary", "Summarize the following documentation in two or three sentences:\n\n{text}"),
    ("explain", "Explain the following to someone who is new to programming:\n\n{text}"),
    ("translation", "Translate the following text into French:\n\n{text}"),
    ("translation", "Translate the following text into Spanish:\n\n{text}"),
    ("list", "Turn the following text into a bulleted list of its key points:\n\n{text}"),
    ("chat", "I read this in the Python documentation and did not understand it. Can you help?\n\n{text}"),
    ("rewrite", "Rewrite the following text in plain, friendly language:\n\n{text}"),
    ("math", "Read this and then make up a small worked example with numbers that shows the idea:\n\n{text}"),
]


def harvest(root: Path):
    """(module, function name, source, docstring) for small documented functions."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part.startswith(SKIP) for part in rel.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
            lines = io.StringIO(source, newline="").readlines()  # split as ast's own: on \n, \r, \r\n
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node) or ""
                if len(doc) >= 40 and 4 <= node.end_lineno - node.lineno <= 24:
                    code = segment(lines, node)
                    if len(code) <= 900:
                        found.append((module, node.name, textwrap.dedent(" " * node.col_offset + code), doc))
    return found


def segment(lines: list[str], node: ast.AST) -> str:
    """ast.get_source_segment of a node over several lines, from lines split once per file
    (get_source_segment splits the whole file again on every call)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    return (lines[first].encode()[node.col_offset:].decode() + "".join(lines[first + 1:last])
            + lines[last].encode()[:node.end_col_offset].decode())


def paragraph(doc: str, limit: int = 600) -> str:
    text = " ".join(doc.split("\n\n")[0].split())
    return text if len(text) <= limit else text[: text.rfind(" ", 0, limit)] + " ..."


def build(count: int) -> list[dict]:
    rng = random.Random(SEED)
    funcs = harvest(Path(sysconfig.get_paths()["stdlib"]))
    rng.shuffle(funcs)
    rows = []
    for i, (module, name, code, doc) in enumerate(funcs[:count]):
        kind = i % 3  # a third each: code given, spec given, docstring text given
        if kind == 0:
            category, template = rng.choice(CODE_TEMPLATES)
            prompt = template.format(code=code.rstrip())
        elif kind == 1:
            category, template = rng.choice(SPEC_TEMPLATES)
            prompt = template.format(name=name, summary=paragraph(doc, 300))
        else:
            category, template = rng.choice(TEXT_TEMPLATES)
            prompt = template.format(text=paragraph(doc))
        rows.append({"prompt": prompt, "category": category, "source": f"{module}:{name}"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1600)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    rows = build(args.count)
    path = args.out / "heads_train_stdlib.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{path}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
