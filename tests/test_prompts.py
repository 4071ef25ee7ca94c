import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ppsd_ray.prompts import read_prompts

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "ppsd_ray" / "data"
FILES = ["heads_train.jsonl", "heads_val.jsonl", "bench.jsonl"]
HEAD_CATEGORIES = {"code", "math", "chat", "summary", "translation", "list"}


def load(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", FILES + ["heads_train_stdlib.jsonl"])
def test_shipped_files_pass_the_reader(name):
    assert [p.prompt for p in read_prompts(DATA / name)] == [row["prompt"] for row in load(name)]


@pytest.mark.parametrize("name", FILES)
def test_every_line_has_prompt_and_category(name):
    rows = load(name)
    assert rows
    for row in rows:
        assert set(row) == {"prompt", "category"}
        assert isinstance(row["prompt"], str) and row["prompt"].strip()
        assert isinstance(row["category"], str) and row["category"]
    assert len({row["prompt"] for row in rows}) == len(rows), "duplicate prompts"


def test_head_sets_counts_and_categories():
    train, val = load("heads_train.jsonl"), load("heads_val.jsonl")
    assert len(train) >= 800 and len(val) >= 150
    train_counts = Counter(row["category"] for row in train)
    val_counts = Counter(row["category"] for row in val)
    assert HEAD_CATEGORIES <= set(train_counts)
    assert set(train_counts) == set(val_counts)
    # same distribution of categories: the val share of every category is the same
    for category in train_counts:
        assert train_counts[category] * len(val) == val_counts[category] * len(train)


def test_bench_counts_and_categories():
    counts = Counter(row["category"] for row in load("bench.jsonl"))
    assert counts == {"code": 12, "math": 12, "chat": 12}


def test_no_overlap_between_sets():
    train, val, bench = ({row["prompt"] for row in load(name)} for name in FILES)
    assert not train & val
    assert not bench & train
    assert not bench & val


def test_held_out_traffic_is_code_and_maths_no_head_set_or_bench_holds():
    """The online-learning bench's traffic: prompts no shipped head trained on, none of the
    validation prompts it is scored on; each code prompt twice, the maths ones distinct."""
    from ppsd_ray.data.build_prompts import held_out_traffic
    train, val, bench = ({row["prompt"] for row in load(name)} for name in FILES)
    rows = held_out_traffic(200, val)
    assert rows == held_out_traffic(200, val) and len(rows) == 200
    assert {r["category"] for r in rows} == {"code", "math"}
    texts = Counter(r["prompt"] for r in rows)
    assert not set(texts) & (train | val | bench)
    assert {n for t, n in texts.items() if t in {r["prompt"] for r in rows if r["category"] == "code"}} == {2}
    assert {n for t, n in texts.items() if t in {r["prompt"] for r in rows if r["category"] == "math"}} == {1}


def test_builder_reproduces_committed_files(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "ppsd_ray.data.build_prompts", "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
    )
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_stdlib_prompts_are_varied_and_held_apart_from_validation():
    rows = load("heads_train_stdlib.jsonl")
    assert len(rows) >= 1000
    assert HEAD_CATEGORIES <= {row["category"] for row in rows}
    assert len({row["source"].split(":")[0] for row in rows}) >= 100  # modules
    assert len({row["prompt"] for row in rows}) >= 0.99 * len(rows)
    stdlib = {row["prompt"] for row in rows}
    assert not stdlib & {row["prompt"] for row in load("heads_val.jsonl")}
    assert not stdlib & {row["prompt"] for row in load("bench.jsonl")}


def test_stdlib_builder_reproduces_committed_file(tmp_path):
    """The file depends on the Python version's standard library; it was built with 3.11.7."""
    if sys.version_info[:3] != (3, 11, 7):
        pytest.skip("built from Python 3.11.7's standard library")
    subprocess.run([sys.executable, "-m", "ppsd_ray.data.build_stdlib_prompts", "--out", str(tmp_path)],
                   cwd=ROOT, check=True)
    assert (tmp_path / "heads_train_stdlib.jsonl").read_bytes() == (DATA / "heads_train_stdlib.jsonl").read_bytes()
