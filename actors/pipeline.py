"""The Python driver API: build a pipeline once, generate many times.

    from actors.pipeline import Pipeline
    from ppsd_ray import GenerationConfig, PipelineConfig

    with Pipeline(PipelineConfig(model_dir=..., stages=2)) as pipe:
        result = pipe.generate(prompt_ids, GenerationConfig(max_new_tokens=64))
        for token in pipe.stream(prompt_ids):   # tokens as soon as they are verified
            ...
"""
from __future__ import annotations

import queue
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from ppsd_ray.cluster import start_ray
from ppsd_ray.config import GenerationConfig, Mode, PipelineConfig, check_prompt
from ppsd_ray.local import LocalPipeline
from ppsd_ray.online import starting_head
from ppsd_ray.plan import Plan, resolve

from .coordinator import Coordinator, Failed
from .learner import HeadLearner, LearnerStatus
from .stage import StageActor


@dataclass
class Generation:
    token_ids: list[int]
    stats: dict


class GenerationError(RuntimeError):
    """A request failed; `token_ids` holds what was committed before it did."""

    def __init__(self, token_ids: list[int], cause: BaseException):
        super().__init__(f"generation failed after {len(token_ids)} committed tokens: {cause}")
        self.token_ids = token_ids


class FeedReader:
    """The caller's end of Coordinator.feed: one thread takes each batch of items and hands
    every item to its request's `deliver`. If the feed breaks (the coordinator died), every
    open request gets the error, as a Failed item."""

    def __init__(self, coordinator):
        self.name = uuid.uuid4().hex
        self._open: dict[str, Callable[[object], None]] = {}
        self._lock = threading.Lock()
        refs = coordinator.feed.remote(self.name)
        self._thread = threading.Thread(target=self._read, args=(refs,), daemon=True, name="ppsd-feed")
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        """Waits for the reader to end once its coordinator is killed. A reader still running at
        ray.shutdown() makes one more Ray call, and Ray starts a new cluster from its thread (its
        auto-init): a bench ended after its last run with exit code 1 and no word, twice (Intel Xeon,
        2026-12-07; Ray's log: "SIGTERM handler is not set because current thread is not the main
        thread", then the first cluster's SIGTERM handler's sys.exit(1))."""
        self._thread.join(timeout_s)

    def open(self, deliver: Callable[[object], None]) -> str:
        """A new request's seq_id, whose items go to deliver (on the reader's thread)."""
        seq_id = uuid.uuid4().hex
        with self._lock:
            self._open[seq_id] = deliver
        return seq_id

    def close(self, seq_id: str) -> None:
        with self._lock:
            self._open.pop(seq_id, None)

    def _read(self, refs) -> None:
        try:
            for ref in refs:
                for seq_id, item in ray.get(ref):
                    with self._lock:
                        deliver = self._open.get(seq_id)
                    if deliver is not None:
                        deliver(item)
        except Exception as e:  # the coordinator is gone: so is every request on it
            with self._lock:
                for deliver in self._open.values():
                    deliver(Failed.of(e))


def check_learning(config: PipelineConfig, plan: Plan) -> None:
    """With learn_drafts, a ValueError naming it unless the plan drafts."""
    if not config.learn_drafts:
        return
    if plan.mode not in (Mode.ppsd, Mode.eesd):
        raise ValueError(f"learn_drafts: the pipeline runs {plan.mode.value}, which drafts nothing to learn from "
                         "(use mode ppsd or eesd)")


class Pipeline:
    def __init__(self, config: PipelineConfig, pg=None, first_bundle: int = 0, plan: Plan | None = None):
        """pg: a ready placement group made by someone else (a Serve replica's own): stage i
        runs in its bundle first_bundle + i with that bundle's resources, the coordinator in
        bundle 0. Without one, GPU stages get a group of their own (one GPU each).
        A constructor that fails leaves nothing running: actors, group and Ray are taken down.
        plan: `ppsd_ray.plan.resolve(config)` if the caller has it already; else resolved here,
        before Ray starts (a ValueError names the field).
        With config.learn_drafts, stage 1 starts from the version store's current head, if any
        (`pipe.plan.head` is then its file), and a HeadLearner learns beside it.
        A plan with in_process (one stage on this CPU, one sequence at a time: plan.in_process)
        runs in this process, and Ray is not started."""
        self.config = config
        self.plan = plan or resolve(config)
        check_learning(config, self.plan)
        self.head_version = 0
        if config.learn_drafts:
            head, self.head_version = starting_head(config.learn, config.model_dir, self.plan.exit_layer,
                                                    self.plan.head)
            self.plan = self.plan.model_copy(update={"head": head})
        self.stages, self.coordinator, self.learner = [], None, None
        self.feed: FeedReader | None = None
        self._pg, self._own_pg = pg, pg is None
        self._started_ray = False
        self.local = LocalPipeline(config, self.plan) if self.plan.in_process else None  # ppsd_ray.local
        if self.local is not None:
            return
        self._started_ray = start_ray()
        try:
            self._start(pg, first_bundle)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, pg, first_bundle: int) -> None:
        config, k = self.config, self.plan.stages
        gpus = config.use_gpus
        if gpus is None:
            gpus = ray.cluster_resources().get("GPU", 0) >= k
        if pg is not None:
            specs = pg.bundle_specs[first_bundle:first_bundle + k]
            if len(specs) < k:
                raise ValueError(f"placement group: {k} stages from bundle {first_bundle} "
                                 f"need {first_bundle + k} bundles, it has {pg.bundle_count}")
            gpus = all(b.get("GPU", 0) >= 1 for b in specs)
        else:  # an actor that cannot be placed would wait forever: say which setting asks too much
            have = ray.cluster_resources()
            need = {"GPU": k, "CPU": k} if gpus else {"CPU": k * config.cpus_per_stage}
            for name, n in need.items():
                if have.get(name, 0) < n:
                    field = "use_gpus" if name == "GPU" else "stages" if gpus else "cpus_per_stage"
                    raise ValueError(f"{field}: {k} stages need {n:g} {name} in the Ray cluster, "
                                     f"it has {have.get(name, 0):g}")
        if pg is None and gpus:  # one bundle per stage, reserved together
            self._pg, first_bundle = placement_group([{"GPU": 1, "CPU": 1}] * k, strategy="PACK"), 0
            ray.get(self._pg.ready(), timeout=600)
        threads = self.plan.threads  # CPU stages: as planned (mode auto may choose fewer than all the cores)
        for i, (start, stop) in enumerate(self.plan.layer_ranges):
            if self._pg:
                bundle = self._pg.bundle_specs[first_bundle + i]
                opts = {"num_gpus": bundle.get("GPU", 0), "num_cpus": bundle.get("CPU", 0), "scheduling_strategy":
                        PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=first_bundle + i)}
            else:
                opts = {"num_cpus": config.cpus_per_stage}
            # a stage whose process dies restarts in its bundle; the coordinator repairs the pipeline
            learning = config.learn_drafts and i == 0
            self.stages.append(StageActor.options(max_restarts=config.max_restarts, **opts).remote(
                str(config.model_dir), start, stop, i, k, self.plan.head, self.plan.exit_layer,
                config.dtype, None if gpus else threads, config.batched_stages, self.head_version,
                config.learn.buffer_positions if learning else 0))
        # made before the stages are up, so that its process imports while they load; it has the
        # feed, and a thread per request started with generate (the health probe has its own group)
        options = {"max_concurrency": 2 * config.max_num_seqs + 2}
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        self.coordinator = Coordinator.options(**options).remote(
            self.stages, list(config.info.eos_token_ids), config.window, config.transport.value, config.timeout_s,
            "nccl" if gpus else None, config.max_num_seqs, config.prefill_chunk, config.max_batch_tokens,
            int(config.kv_budget_gb * 2**30) // max(1, config.info.kv_bytes_per_token), config.draft_max_seqs,
            self.plan.mode.value)
        self.layout = ray.get([s.ready.remote() for s in self.stages], timeout=config.timeout_s * 5)
        if config.learn_drafts:  # on stage 1's node: the version files it loads are written there
            node = ray.get(self.stages[0].node_id.remote(), timeout=config.timeout_s)
            self.learner = HeadLearner.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                str(config.model_dir), self.plan.exit_layer, self.plan.head, self.head_version,
                config.learn.model_dump(), self.stages[0])
        ray.get(self.coordinator.connect.remote(), timeout=config.timeout_s)
        self.feed = FeedReader(self.coordinator)

    def stream(self, prompt_ids: list[int], gen: GenerationConfig | None = None) -> Iterator[int | dict]:
        """Yields each token id as soon as it is verified (a TokenLogprobs when gen.logprobs is
        set), then the stats dict. A bad prompt raises ValueError here, before any actor call.
        Closing the iterator early cancels the request. Every stream of this Pipeline comes
        through one feed from the coordinator (Coordinator.feed): one Ray item a step, not one
        a token."""
        gen = gen or GenerationConfig()
        check_prompt(prompt_ids, self.config.info, gen)
        if self.local is not None:
            return self.local.stream(list(prompt_ids), gen)
        items = queue.SimpleQueue()
        seq_id = self.feed.open(items.put)
        try:
            ray.get(self.coordinator.start.remote(self.feed.name, seq_id, list(prompt_ids), gen.model_dump()),
                    timeout=self.config.timeout_s)
        except BaseException:
            self.feed.close(seq_id)
            raise
        return self._items(seq_id, items)

    def _items(self, seq_id: str, items: queue.SimpleQueue) -> Iterator[int | dict]:
        finished = False
        try:
            while True:
                try:
                    item = items.get(timeout=self.config.timeout_s)
                except queue.Empty:
                    raise ray.exceptions.GetTimeoutError(
                        f"no token within timeout_s ({self.config.timeout_s:g} s)") from None
                if isinstance(item, Failed):
                    finished = True
                    raise item.error
                if item is None:  # still waiting for admission
                    continue
                finished = isinstance(item, dict)
                yield item
                if finished:
                    return
        finally:
            self.feed.close(seq_id)
            if not finished and self.coordinator is not None:
                self.coordinator.cancel.remote(seq_id)

    def generate(self, prompt_ids: list[int], gen: GenerationConfig | None = None) -> Generation:
        tokens: list[int] = []
        stream = self.stream(prompt_ids, gen)
        try:
            for item in stream:
                if isinstance(item, dict):
                    return Generation(tokens, item)
                tokens.append(item)
        except Exception as e:
            raise GenerationError(tokens, e) from e
        raise GenerationError(tokens, RuntimeError("stream ended without stats"))

    def generate_many(self, prompts: list[list[int]], gen: GenerationConfig | list[GenerationConfig] | None = None,
                      on_done=None) -> list[Generation]:
        """Generates every prompt at once: their calls share each stage's forwards. `gen`: one
        config for all, or one per prompt. Returns the results in order; `on_done(i, result)`
        is called as each finishes. A failed request raises its GenerationError once the
        others have finished. Fastest on a pipeline planned for that many (config.concurrency):
        one planned for a single sequence computes a batch's rows one by one."""
        gens = gen if isinstance(gen, list) else [gen] * len(prompts)
        for ids, g in zip(prompts, gens):  # a bad prompt fails before any is started
            check_prompt(ids, self.config.info, g or GenerationConfig())
        if self.local is not None:  # one at a time, on this thread (LocalPipeline)
            results, errors = [], []
            for i, (ids, g) in enumerate(zip(prompts, gens)):
                try:
                    results.append(self.generate(ids, g))
                except GenerationError as e:
                    errors.append(e)
                    continue
                if on_done is not None:
                    on_done(i, results[-1])
            if errors:
                raise errors[0]
            return results
        with ThreadPoolExecutor(max(1, len(prompts)), thread_name_prefix="ppsd-generate") as pool:
            futures = [pool.submit(self.generate, ids, g) for ids, g in zip(prompts, gens)]
            if on_done is not None:
                for i, f in enumerate(futures):
                    f.add_done_callback(lambda f, i=i: f.exception() or on_done(i, f.result()))
            wait(futures)
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
        return [f.result() for f in futures]

    def learner_status(self) -> LearnerStatus | None:
        """With learn_drafts: the head version, positions seen, rounds and installs so far."""
        return ray.get(self.learner.status.remote(), timeout=self.config.timeout_s) if self.learner else None

    def shutdown(self) -> None:
        for actor in [self.learner, self.coordinator, *self.stages]:
            if actor is not None:
                ray.kill(actor)
        if self.feed is not None:
            self.feed.join(timeout_s=10)
        self.stages, self.coordinator, self.learner, self.feed, self.local = [], None, None, None, None
        if self._pg and self._own_pg:
            remove_placement_group(self._pg)
            self._pg = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
