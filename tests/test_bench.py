"""`ppsd bench` machinery on the tiny model: every output is written and every system is
checked against transformers' greedy output. Nothing here is timed."""
import json
import subprocess
import sys


def test_bench_writes_json_markdown_and_plots(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the people of the world", "category": "code"}\n'
                       '{"prompt": "water is good for life", "category": "chat"}\n')
    out, md = tmp_path / "out", tmp_path / "B.md"
    gpu = tmp_path / "gpu.json"
    # the last load test and soak (ppsd_ray.loadtest --out) are shown with their own command
    setup = {"command": "python -m ppsd_ray.loadtest X", "server": "ppsd serve", "date": "2026-11-28 01:00 UTC",
             "cpu": "cpu", "cores": 2}
    out.mkdir()
    (out / "load.json").write_text(json.dumps({
        "setup": setup, "clients": 32, "identical": 32, "errors": [], "ttft_s": {"p50": 0.25, "p99": 1.5},
        "tokens_per_s": 21.0, "client_tokens_per_s": {"p50": 0.7, "p99": 0.9},
        "alone": {"ttft_s": {"p50": 0.1, "p99": 0.2}, "tokens_per_s": {"p50": 14.0, "p99": 15.0}}}))
    (out / "soak.json").write_text(json.dumps({
        "setup": setup, "minutes": 20.0, "clients": 8, "requests": 900, "error_count": 0,
        "latency_s": {"p50": 2.0, "p99": 9.0}, "leaked": False, "rss_mib_total": {"start": 2000, "end": 2030}}))
    # the last load sweep, with the box's own speed change over it
    level = {"clients": 4, "tokens": 256, "wall_s": 8.0, "ttft_s": [0.5, 0.5, 0.6, 0.7], "itl_s": [0.1] * 252,
             "identical": 4, "compared": 4, "errors": [], "acceptance": None, "note": "", "tokens_per_s": 32.0}
    (out / "load_sweep.json").write_text(json.dumps({
        "setup": setup | {"prompts": 4, "max_new_tokens": 64, "levels": [4], "exit_layer": 15,
                          "box": {"calibrated_ms": {"2": 40.0}, "probes_ms": [{"2": 50.0}, {"2": 44.0}]}},
        "results": [level | {"system": "ar", "predicted": 44.0},
                    level | {"system": "hf-generate", "predicted": None, "compared": 0}]}))
    gpu.write_text(json.dumps({"shapes": {"llama2-7b": {"full_layers": 32, "per_layer_ms": 0.5, "fixed_ms": 1.0,
                                                        "lm_head_ms": 0.2}}}))
    run = subprocess.run([sys.executable, "-m", "ppsd_ray.cli", "bench", "--model", str(tiny_model_dir),
                          "--prompts-file", str(prompts), "--max-new-tokens", "10", "--reps", "2",
                          "--systems", "hf,hf-ee,ar,pp-K2,pp-K2/ray,eesd-K2-g2,ppsd-K2,ppsd-K2/ray,ppsd-K2-t0.7,default,ar-1core,ar-actor",
                          "--out", str(out),
                          "--markdown", str(md), "--gpu-layers", str(gpu)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert len(result["records"]) == 2 * 2 * 12
    assert all(r["lossless"] for r in result["records"] if r["system"] != "ppsd-K2-t0.7")
    assert all(r["lossless"] is None for r in result["records"] if r["system"] == "ppsd-K2-t0.7")
    summary = result["summary"]["systems"]
    assert set(summary) == {"hf", "hf-ee", "ar", "pp-K2", "pp-K2/ray", "eesd-K2-g2", "ppsd-K2", "ppsd-K2/ray",
                            "ppsd-K2-t0.7", "default", "ar-1core", "ar-actor"}
    assert summary["ppsd-K2/ray"]["transport"] == "ray" and summary["ppsd-K2"]["transport"] == "direct"
    assert set(result["summary"]["hop_s"]) == {"K2/direct", "K2/ray"}
    assert summary["ppsd-K2-t0.7"]["all"]["acceptance"] is not None
    assert {"acceptance", "ideal", "efficiency"} <= set(summary["ppsd-K2"]["all"])
    assert "simulator" in summary["ppsd-K2"] and summary["ppsd-K2"]["code"]["tokens_per_s"] > 0
    # every system of ours shows the plan's prediction beside the measurement; K stages of a core
    # each are also compared with ar on one core
    unpredicted = {"hf", "hf-ee", "eesd-K2-g2"}  # transformers; eesd, which the plan does not model
    assert all(summary[n]["plan"]["predicted_tokens_per_s"] > 0 for n in summary if n not in unpredicted)
    assert all("plan" not in summary[n] for n in unpredicted)
    plan, ar = summary["ppsd-K2"]["plan"], summary["ar"]["plan"]  # and its error relative to ar's
    assert abs((1 + plan["error_vs_ar"]) * (1 + ar["error"]) - (1 + plan["error"])) < 1e-9
    assert summary["ppsd-K2"]["all"]["per_device"] > 0 and summary["ar"]["all"]["per_device"] is None
    assert result["setup"]["default_plan"].startswith(("ar on 1 stage", "ppsd on", "pp on"))
    # one stage for one sequence runs in the bench's own process, as `ppsd generate` runs it
    assert {"ar", "ar-1core"} <= set(result["setup"]["in_process"])
    assert not {"pp-K2", "ar-actor"} & set(result["setup"]["in_process"])
    # the box's own speed, timed before each round for each thread count a plan used; each prediction
    # is also read at the speed of its run's round
    box = result["setup"]["box"]
    assert set(box["calibrated_ms"]) >= {"1"} and len(box["probes_ms"]) == 2 * 2
    assert all(r["box_ms"] == box["probes_ms"][r["rep"] * 2 + r["prompt"]] for r in result["records"])
    ar_run = next(r for r in result["records"] if r["system"] == "ar-1core")
    assert set(ar_run["box_ms"]) == set(box["calibrated_ms"]) and all(v > 0 for v in ar_run["box_ms"].values())
    assert all("box_error" in summary[n]["plan"] for n in summary if n not in unpredicted)
    assert [p["shape"] for p in result["projections"]][0] == "llama2-7b"
    assert {p["transport"] for p in result["projections"]} == {"direct", "ray"}
    text = md.read_text()
    assert f"{plan['predicted_tokens_per_s']:.1f} ({100 * plan['error']:+.0f}%; " in text
    steps = summary["ppsd-K2"]["breakdown_ms_per_token"]["stage_step"]
    assert len(steps) == 2 and all(x > 0 for x in steps)
    assert "| stage step |" in text and f"{steps[0]:.1f} / {steps[1]:.1f}" in text
    assert "| 32 | 32 | 0 | 250 / 1500 | 21.0 | 0.70 | 100 | 14.0 |" in text
    assert "| 20.0 | 900 | 0 | 2000 / 9000 | no | 2000 | 2030 | +1.5% |" in text
    assert "| ar | 4 | 32.0 | 40.0 | 44.0 (+10%) | 0.60 / 0.70 | 100 | 4/4 | 0 | – |  |" in text
    assert "2 thread(s): 40.0 ms calibrated; 2 timings during the run, median 47.0 (44.0-50.0, +18%)" in text
    at_box = summary["ppsd-K2"]["plan"]
    assert f"| {at_box['box_tokens_per_s']:.1f} ({100 * at_box['box_error']:+.0f}%) |" in text
    for needle in ["| ppsd-K2 |", "| default |", "plan predicts", "Box speed during the run", "Simulator check", "Projected multi-GPU", "speedup_vs_acceptance.png", "timeline.png"]:
        assert needle in text
    assert (out / "speedup_vs_acceptance.png").stat().st_size > 10_000
    assert (out / "timeline.png").stat().st_size > 10_000
    # after a kill, load or soak run the report is written again from what was stored, unchanged
    md.unlink()
    again = subprocess.run([sys.executable, "-m", "ppsd_ray.cli", "bench", "--report-only", "--out", str(out),
                            "--markdown", str(md)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert md.read_text() == text


def test_bad_system_names_fail_early(tiny_model_dir):
    run = subprocess.run([sys.executable, "-m", "ppsd_ray.cli", "bench", "--model", str(tiny_model_dir),
                          "--systems", "hf,ppsd-K2-g4"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "systems" in run.stderr
