"""The pipeline across two Ray nodes (two raylets on this machine, each with a resource of
its own; a STRICT_SPREAD placement group puts the stages on different nodes): lossless on
both transports, with stage 1 and stage 2 reporting different node ids."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import hf_greedy, ray_cluster_nodes

REPO = Path(__file__).resolve().parents[1]
PROMPT = [3, 5, 78, 7, 5, 195, 4, 3]

DRIVER = """
import json, sys
import ray
from ray.util.placement_group import placement_group
from actors.pipeline import Pipeline
from ppsd_ray.config import GenerationConfig, PipelineConfig

address, model_dir, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ray.init(address=address, log_to_driver=False)
pg = placement_group([{"CPU": 1, "node_a": 1}, {"CPU": 1, "node_b": 1}], strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=120)
out = {}
for transport in ["direct", "ray"]:
    config = PipelineConfig(model_dir=model_dir, stages=2, transport=transport, threads_per_stage=1)
    with Pipeline(config, pg=pg) as pipe:
        node_ids = ray.get([s.node_id.remote() for s in pipe.stages])
        runs = {mode: pipe.generate(prompt, GenerationConfig(mode=mode, max_new_tokens=24, stop_on_eos=False))
                for mode in ["pp", "ppsd", "eesd"]}
        out[transport] = {"nodes": node_ids, "tokens": {m: r.token_ids for m, r in runs.items()},
                          "rollbacks": runs["ppsd"].stats["rollbacks"]}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_two_node_pipeline_is_lossless_on_both_transports(tiny_model_dir, tmp_path):
    nodes = [["--num-cpus", "1", "--resources", json.dumps({"node_a": 1})],
             ["--num-cpus", "1", "--resources", json.dumps({"node_b": 1})]]
    with ray_cluster_nodes(tmp_path, nodes) as (address, env):
        run = subprocess.run([sys.executable, "-c", DRIVER, address, str(tiny_model_dir), json.dumps(PROMPT)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1])
    want = hf_greedy(tiny_model_dir, PROMPT, 24, stop_on_eos=False)
    for transport in ["direct", "ray"]:
        r = result[transport]
        assert r["nodes"][0] != r["nodes"][1], transport
        assert r["tokens"] == {"pp": want, "ppsd": want, "eesd": want}, transport
        assert r["rollbacks"] > 0
