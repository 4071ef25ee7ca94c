"""The distillation data job on the tiny model (ppsd_ray/teacher.py, corpus.py): stored
positions are the model's own values, shards are shuffled but cover every planned position
once, a re-run resumes without recomputing, a head trains on the shards, the CLI and job."""
from __future__ import annotations

import json
import sys
from email.message import Message
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import WORDS
from ppsd_ray import corpus
from ppsd_ray import distill as D
from ppsd_ray import teacher as T

EXIT = 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Text the tiny word-level tokenizer knows (most stdlib text is <unk> to it)."""
    root = tmp_path_factory.mktemp("text")
    for i in range(5):
        words = [WORDS[(i * 31 + j * 7 + j * j) % len(WORDS)] for j in range(90 + 25 * i)]
        (root / f"doc{i}.txt").write_text(" ".join(words))
    return root


def spec_for(text_dir, **kw) -> T.TeacherSpec:
    args = dict(sources=(f"text:{text_dir}", "stdlib"), exit_layers=(EXIT, 5), positions=700, chunk_tokens=40,
                shard_positions=150, topk=8)
    return T.TeacherSpec(**{**args, **kw})


def read_all(out: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [load_file(out / s["file"]) for s in manifest["shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def planned(model_dir, spec) -> dict[tuple[int, int], corpus.Chunk]:
    """The chunks the job plans for a spec: (source index, chunk index) -> chunk."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    streams = {s: corpus.chunks(tok, s, spec.seed, spec.chunk_tokens, spec.chat) for s in spec.sources}
    out, n, live = {}, 0, list(spec.sources)
    while n < spec.positions and live:
        for s in list(live):
            if n >= spec.positions:
                break
            c = next(streams[s], None)
            if c is None:
                live.remove(s)
                continue
            out[(spec.sources.index(s), c.index)] = c
            n += len(c.ids) - 1 - c.start
    return out


@pytest.fixture(scope="module")
def built(tiny_model_dir, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    spec = spec_for(text_dir)
    manifest = T.build_teacher_forced(tiny_model_dir, spec, out, batch_size=3, progress=False)
    return out, spec, manifest


def test_stored_positions_are_the_models_own(tiny_model_dir, built):
    out, spec, manifest = built
    data = read_all(out)
    chunks = planned(tiny_model_dir, spec)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    checked = 0
    for (src, idx), c in list(chunks.items())[::3]:
        with torch.no_grad():
            o = model(torch.tensor([c.ids]), output_hidden_states=True)
        rows = ((data["source"] == src) & (data["chunk"] == idx)).nonzero()[:, 0]
        pos = data["pos"][rows].long()
        assert sorted(pos.tolist()) == list(range(c.start, len(c.ids) - 1))
        ids = torch.tensor(c.ids)
        assert torch.equal(data["ids"][rows].long(), ids[pos]) and torch.equal(data["next_ids"][rows].long(), ids[pos + 1])
        logits = o.logits[0, pos]
        assert torch.equal(data["topk_ids"][rows, 0].long(), logits.argmax(-1))
        probs, top = torch.softmax(logits, -1).topk(spec.topk, -1)
        assert torch.equal(data["topk_ids"][rows].long(), top)
        torch.testing.assert_close(data["topk_probs"][rows].float(), probs, atol=1e-3, rtol=1e-2)
        for e in spec.exit_layers:  # hidden_states[e] is the output of layer e (index 0: the embeddings)
            torch.testing.assert_close(data[f"exit{e}"][rows].float(), o.hidden_states[e][0, pos], atol=2e-3, rtol=2e-3)
        checked += len(rows)
    assert checked > 100


def test_shards_are_shuffled_and_cover_every_position_once(tiny_model_dir, built):
    out, spec, manifest = built
    data = read_all(out)
    got = list(zip(data["source"].tolist(), data["chunk"].tolist(), data["pos"].tolist()))
    want = [(s, i, p) for (s, i), c in planned(tiny_model_dir, spec).items() for p in range(c.start, len(c.ids) - 1)]
    assert len(got) == len(set(got)) and set(got) == set(want)
    assert manifest["positions"] == len(want) >= spec.positions
    assert sum(v["positions"] for v in manifest["sources"].values()) == len(want)
    assert all(v["positions"] > 0 for v in manifest["sources"].values())
    assert len(manifest["shards"]) >= 3 and all(s["positions"] >= spec.shard_positions
                                                for s in manifest["shards"][:-1])
    first = load_file(out / manifest["shards"][0]["file"])
    assert len(set(first["chunk"].tolist())) > 1
    assert first["pos"].tolist() != sorted(first["pos"].tolist())  # not in sequence order
    assert (first["chunk"][1:] != first["chunk"][:-1]).float().mean() > 0.5  # chunks interleaved


def test_rerun_resumes_without_recomputing(tiny_model_dir, text_dir, built, tmp_path, monkeypatch):
    _, _, straight = built
    spec = spec_for(text_dir)
    calls = []
    run = T.Teacher.run
    monkeypatch.setattr(T.Teacher, "run", lambda self, chunks: calls.append(len(chunks)) or run(self, chunks))
    first = T.build_teacher_forced(tiny_model_dir, spec, tmp_path, batch_size=3, progress=False, stop_after_shards=1)
    assert len(first["shards"]) == 1
    (tmp_path / "shard-00001.safetensors").write_bytes(b"half-written and never recorded")
    done_first = sum(map(len, first["done"].values()))
    n_first = sum(calls)
    calls.clear()
    second = T.build_teacher_forced(tiny_model_dir, spec, tmp_path, batch_size=3, progress=False)
    assert sum(calls) == sum(straight["sources"][s]["chunks"] for s in spec.sources) - done_first
    assert n_first >= done_first and second["complete"]
    assert {s: sorted(v) for s, v in second["done"].items()} == {s: sorted(v) for s, v in straight["done"].items()}
    a, b = read_all(tmp_path), read_all(built[0])
    key = lambda d: sorted(zip(d["source"].tolist(), d["chunk"].tolist(), d["pos"].tolist()))  # noqa: E731
    assert key(a) == key(b)
    calls.clear()
    again = T.build_teacher_forced(tiny_model_dir, spec, tmp_path, batch_size=3, progress=False)
    assert calls == [] and again["positions"] == second["positions"] and again["run"]["new_positions"] == 0
    more = T.build_teacher_forced(tiny_model_dir, spec_for(text_dir, positions=900), tmp_path, batch_size=3,
                                  progress=False)  # a larger target continues
    assert more["positions"] >= 900 and 0 < sum(calls) < sum(more["sources"][s]["chunks"] for s in spec.sources)
    with pytest.raises(ValueError, match="other settings"):
        T.build_teacher_forced(tiny_model_dir, spec_for(text_dir, topk=4), tmp_path, progress=False)


def test_answers_source_reuses_distills_generation(tiny_model_dir, text_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PPSD_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i: i + 5])}) + "\n" for i in range(0, 30, 5)))
    spec = T.TeacherSpec(sources=("answers", f"text:{text_dir}"), exit_layers=(EXIT,), positions=10_000,
                         chunk_tokens=40, shard_positions=100, topk=4, answers_prompts=(str(prompts),), answers=1,
                         answers_max_new_tokens=10)
    m = T.build_teacher_forced(tiny_model_dir, spec, tmp_path / "out", progress=False)
    data = read_all(tmp_path / "out")
    ans = data["source"] == 0
    assert m["sources"]["answers"]["chunks"] == 6 and int(ans.sum()) == m["sources"]["answers"]["positions"] > 0
    # greedy answers: each next token is the teacher's top 1 there
    assert torch.equal(data["topk_ids"][ans, 0], data["next_ids"][ans])
    assert m["complete"] and m["sources"][f"text:{text_dir}"]["positions"] > 0


def test_topk_loss_is_the_full_kl_with_the_whole_vocabulary(tiny_model_dir):
    torch.manual_seed(0)
    head = D.new_head("linear", tiny_model_dir, EXIT)
    torch.nn.init.normal_(head.proj.weight, std=0.05)
    x = torch.randn(6, head.lm_head.weight.shape[1])
    teacher = torch.log_softmax(torch.randn(6, head.lm_head.weight.shape[0]) * 2, -1)
    probs, ids = teacher.exp().topk(teacher.shape[-1], -1)
    full = F.kl_div(torch.log_softmax(head.logits(head.features(x)), -1), teacher, log_target=True,
                    reduction="batchmean")
    torch.testing.assert_close(D.topk_loss(head, x, ids, probs, bf16=False), full, atol=1e-4, rtol=1e-4)
    small = D.topk_loss(head, x, ids[:, :8], probs[:, :8], bf16=False)  # coarser partition: a lower bound
    assert 0 <= small <= full + 1e-6


def test_a_head_trains_on_the_shards(tiny_model_dir, built):
    out, spec, _ = built
    data = D.TopkData(out, EXIT, batch_positions=64, seed=0, bf16=False)
    assert data.tokens == json.loads((out / "manifest.json").read_text())["positions"]
    torch.manual_seed(0)
    head = D.new_head("linear", tiny_model_dir, EXIT)
    before = D.topk_agreement(head, data)
    stats = D.train_head(head, data, D.TrainSpec(head_type="linear", epochs=4, warmup=2, bf16=False), progress=False)
    losses = stats["losses"]
    k = data.per_epoch
    assert stats["steps"] == 4 * k and stats["training_tokens"] == data.tokens
    assert sum(losses[-k:]) / k < 0.8 * sum(losses[:k]) / k
    assert D.topk_agreement(head, data)["greedy"] > before["greedy"]
    x, ids, probs = data.batch_at(0, 0)
    n = min(64, data.tokens)
    assert x.shape == (n, head.lm_head.weight.shape[1]) and ids.shape == probs.shape == (n, spec.topk)
    with pytest.raises(ValueError, match="exit_layer"):
        D.TopkData(out, 4)
    layer = D.new_head("layer", tiny_model_dir, EXIT)
    with pytest.raises(ValueError, match="single positions"):
        D.train_head(layer, data, D.TrainSpec(head_type="layer", epochs=1), progress=False)


def test_cli_and_job(tiny_model_dir, text_dir, tmp_path, capsys):
    from ppsd_ray.cli import main

    args = ["--model", str(tiny_model_dir), "--exit-layers", str(EXIT), "--sources", f"text:{text_dir}",
            "--positions", "200", "--chunk-tokens", "40", "--shard-positions", "100", "--no-progress"]
    assert main(["distill-data", *args, "--out", str(tmp_path / "a")]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["positions"] >= 200 and summary["complete"] and summary["positions_per_hour"] > 0
    assert main(["distill-data", *args, "--exit-layers", "99", "--out", str(tmp_path / "b")]) == 2
    assert "exit_layers" in capsys.readouterr().err
    assert main(["distill-data", *args, "--sources", "nonsense", "--out", str(tmp_path / "b")]) == 2
    sys.path.insert(0, str(REPO / "jobs"))
    import distill_data

    assert distill_data.main([*args, "--out", str(tmp_path / "a")]) == 0  # resumes: nothing left to do
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["new_positions"] == 0


def test_licence_filter_and_man_pages():
    def meta(**fields):
        m = Message()
        for k, v in fields.items():
            for x in v if isinstance(v, list) else [v]:
                m[k.replace("_", "-")] = x
        return m

    assert corpus.permissive(meta(License_Expression="MIT"))
    assert corpus.permissive(meta(Classifier=["License :: OSI Approved :: BSD License"]))
    assert corpus.permissive(meta(License="Apache 2.0"))
    assert not corpus.permissive(meta(License="GPLv2"))
    assert not corpus.permissive(meta(License_Expression="MIT OR GPL-3.0"))
    assert not corpus.permissive(meta(License="UNKNOWN"))
    roff = ('.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n'
            'List \\fBfiles\\fR and\n.BR read (2)\nfor \\(aqyou\\(aq.\n.nf\nline one\nline two\n.fi\n')
    text = corpus.roff_to_text(roff)
    assert text.startswith("NAME\nls - list directory contents") and "comment" not in text
    assert "List files and read(2) for 'you'." in text and "line one\nline two" in text
    docs = corpus.docstrings('"""Mod doc."""\nclass A:\n    """A doc."""\n    def f(self, x=1):\n        """F doc."""\n',
                             "pkg/mod.py")
    assert docs == "module pkg.mod\nMod doc.\n\nclass pkg.mod.A\nA doc.\n\ndef pkg.mod.A.f(self, x=1)\nF doc."


def test_training_job_trains_on_teacher_data(tiny_model_dir, built, tmp_path, monkeypatch):
    """jobs/train_exit_head.py --teacher-data: a linear head from the shards, validated as ever."""
    out, _, manifest = built
    monkeypatch.setenv("PPSD_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "val.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i: i + 4])}) + "\n" for i in range(0, 24, 4)))
    sys.path.insert(0, str(REPO / "jobs"))
    import train_exit_head

    args = ["--model", str(tiny_model_dir), "--exit-layer", str(EXIT), "--teacher-data", str(out),
            "--val-prompts", str(prompts), "--val-max-new-tokens", "6", "--workers", "0", "--epochs", "2",
            "--batch-positions", "128", "--data-layers", "", "--no-progress", "--out", str(tmp_path / "h.safetensors")]
    assert train_exit_head.main(args) == 0
    from ppsd_ray.heads import read_head_meta

    meta = read_head_meta(tmp_path / "h.safetensors")
    assert meta["training_tokens"] == manifest["positions"] and len(meta["history"]) == 2
    assert meta["data"][0]["teacher_data"] == str(out.resolve()) and meta["data"][0]["key"] == manifest["key"]
    with pytest.raises(SystemExit, match="linear"):
        train_exit_head.main([*args[:-2], "--head-type", "layer", "--out", str(tmp_path / "l.safetensors")])
