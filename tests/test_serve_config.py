"""serve_config.yaml and the application builder, offline (no Ray started)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve_config.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.import_path == "actors.serve:build_app"

    from actors.serve import ServeSettings, build_app

    module, name = app.import_path.split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is build_app
    ServeSettings(**app.args)  # every arg is a known setting


def test_builder_reserves_one_bundle_per_stage_plus_the_replica(tiny_model_dir):
    from actors.serve import build_app

    app = build_app({"pipeline": {"model_dir": str(tiny_model_dir), "stages": 3, "use_gpus": False,
                                  "cpus_per_stage": 0.25}, "max_ongoing_requests": 5})
    d = app._bound_deployment
    assert d._replica_config.placement_group_bundles == [{"CPU": 0.1}] + [{"CPU": 0.25}] * 3
    assert d._replica_config.placement_group_strategy == "PACK"
    assert d.max_ongoing_requests == 5
    gpu = build_app({"pipeline": {"model_dir": str(tiny_model_dir), "stages": 2, "use_gpus": True}})._bound_deployment
    assert gpu._replica_config.placement_group_bundles == [{"CPU": 0.1}] + [{"GPU": 1, "CPU": 1}] * 2


@pytest.mark.parametrize("pipeline,args,field", [({"stages": 9}, {}, "pipeline.stages"),
                                                 ({"stagez": 2}, {}, "pipeline.stagez"),
                                                 ({}, {"stages": 2}, "stages"),
                                                 ({"stages": 1}, {"mode": "ppsd"}, "mode"),
                                                 ({}, {"max_tokens_limit": 0}, "max_tokens_limit")])
def test_builder_names_the_bad_setting(tiny_model_dir, pipeline, args, field):
    from actors.serve import build_app

    with pytest.raises(ValueError, match=field):
        build_app({"pipeline": {"model_dir": str(tiny_model_dir), **pipeline}, **args})


def test_a_key_seen_by_the_builder_is_required_in_the_replica(tiny_model_dir, monkeypatch):
    from actors.serve import API_KEY_ENV, ServeSettings, build_app

    pipeline = {"model_dir": str(tiny_model_dir)}
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert build_app({"pipeline": pipeline})._bound_deployment.init_args[0]["require_api_key"] is False
    monkeypatch.setenv(API_KEY_ENV, "k")
    settings = build_app({"pipeline": pipeline})._bound_deployment.init_args[0]
    assert settings["require_api_key"] is True and settings["api_key"] is None  # the key stays out of args
    monkeypatch.delenv(API_KEY_ENV)  # the replica's environment lacks it: it refuses to start
    with pytest.raises(RuntimeError, match=API_KEY_ENV):
        ServeSettings(**settings).replica_key()
    monkeypatch.setenv(API_KEY_ENV, "k")
    assert ServeSettings(**settings).replica_key() == "k"
