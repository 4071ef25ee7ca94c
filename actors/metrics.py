"""Prometheus metrics of a pipeline, recorded by its Coordinator with ray.util.metrics.

Ray exports them on each node's metrics endpoint (`ray_` is prefixed to every
name; see docs/serving.md). Everything is recorded once per request from the
request's stats, except the time to first token, recorded once when the first
token is committed: the per-token loop makes no extra calls.
"""
from __future__ import annotations

import threading

from ray.util.metrics import Counter, Gauge, Histogram

from ppsd_ray.schedule import RequestStats

LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class PipelineMetrics:
    def __init__(self):
        mode = ("mode",)
        self.requests = Counter("ppsd_requests", "requests finished, by mode and status (ok, error, cancelled)",
                                tag_keys=("mode", "status"))
        self.running = Gauge("ppsd_requests_running", "requests being decoded now")
        self.tokens = Counter("ppsd_tokens", "committed (generated) tokens", tag_keys=mode)
        self.prompt_tokens = Counter("ppsd_prompt_tokens", "prompt tokens prefilled", tag_keys=mode)
        drafts = ("mode", "head_version")  # online learning: acceptance per exit head version over time
        self.drafted = Counter("ppsd_drafted_tokens", "drafts that entered the pipe and were checked",
                               tag_keys=drafts)
        self.accepted = Counter("ppsd_accepted_tokens", "drafts equal to the verified token", tag_keys=drafts)
        self.head_version = Gauge("ppsd_draft_head_version", "the exit head version of the newest request "
                                                             "that drafted (online learning)")
        self.rollbacks = Counter("ppsd_rollbacks", "rejected drafts: pipeline rollbacks", tag_keys=mode)
        self.busy = Counter("ppsd_stage_busy_seconds", "seconds each stage spent computing",
                            tag_keys=("stage",))
        self.stale = Counter("ppsd_stage_stale_seconds", "of those, seconds on positions later rolled back",
                             tag_keys=("stage",))
        self.latency = Histogram("ppsd_request_latency_seconds", "request start to last token",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=mode)
        self.ttft = Histogram("ppsd_time_to_first_token_seconds", "request start to first committed token",
                              boundaries=LATENCY_BOUNDARIES, tag_keys=mode)
        self._running = 0
        self._lock = threading.Lock()  # requests run on the coordinator's threads

    def started(self) -> None:
        with self._lock:
            self._running += 1
            self.running.set(self._running)

    def first_token(self, mode: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"mode": mode})

    def finished(self, mode: str, status: str, prompt_tokens: int, stats: RequestStats, seconds: float) -> None:
        with self._lock:
            self._running -= 1
            self.running.set(self._running)
        tags = {"mode": mode}
        self.requests.inc(1, tags={"mode": mode, "status": status})
        self.latency.observe(seconds, tags=tags)
        self.prompt_tokens.inc(prompt_tokens, tags=tags)
        for counter, value in ((self.tokens, stats.new_tokens), (self.rollbacks, stats.rollbacks)):
            if value:
                counter.inc(value, tags=tags)
        if stats.drafted:
            version = {**tags, "head_version": str(stats.head_version)}
            self.drafted.inc(stats.drafted, tags=version)
            if stats.accepted:
                self.accepted.inc(stats.accepted, tags=version)
            self.head_version.set(stats.head_version or 0)
        for stage in stats.stages:
            if stage.compute_s > 0:
                self.busy.inc(stage.compute_s, tags={"stage": str(stage.index)})
            if stage.stale_s > 0:
                self.stale.inc(stage.stale_s, tags={"stage": str(stage.index)})
