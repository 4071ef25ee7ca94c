"""Smoke test of bench/gpu_layer_latency.py (the standalone GPU script) on a tiny CPU shape."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_layer_latency.py"


def test_gpu_script_tiny_cpu(tmp_path):
    out = tmp_path / "gpu_layers.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "tiny", "--steps", "5",
         "--warmup", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tree = ast.parse(SCRIPT.read_text())
    mods = {n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert {m.split(".")[0] for m in mods} - set(sys.stdlib_module_names) <= {"torch", "transformers"}
    rep = json.loads(out.read_text())
    for key in ("date", "device", "torch", "transformers", "dtype", "elapsed_s", "shapes", "skipped"):
        assert key in rep
    assert rep["skipped"] == []
    tiny = rep["shapes"]["tiny"]
    assert set(tiny["ms_per_token"]) == {"2", "4"}
    assert all(v > 0 for v in tiny["ms_per_token"].values())
    for key in ("per_layer_ms", "fixed_ms", "projected_full_ms", "lm_head_ms"):
        assert isinstance(tiny[key], float), key
    assert tiny["projected_full_ms"] > 0 and tiny["lm_head_ms"] > 0
    assert "elapsed" in proc.stdout
