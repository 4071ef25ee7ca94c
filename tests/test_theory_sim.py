"""The theory formulas and the discrete-event simulator agree where they must."""
import random

import pytest

from ppsd_ray.simulate import Timing, calibrate_hop, decode_step_times, simulate
from ppsd_ray.theory import eesd_speedup, efficiency, ppsd_speedup


def test_theory_matches_the_worked_examples():
    assert ppsd_speedup(0.8, 4) == pytest.approx(2.5)
    assert ppsd_speedup(0.0, 4) == pytest.approx(1.0) and ppsd_speedup(1.0, 4) == pytest.approx(4.0)
    assert eesd_speedup(0.5, 8, 0.25) == pytest.approx(0.665, abs=1e-3)
    assert efficiency(2.5, 0.8, 4) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_simulator_without_overheads_reaches_the_ideal_speedup(k, alpha):
    rng = random.Random(1)
    trace = [rng.random() < alpha for _ in range(3000)]
    timing = Timing([1.0] * k, hop_s=0.0)
    pp = simulate(timing, [], 3000, window=1).decode_s
    ppsd = simulate(timing, trace, 3000, window=k).decode_s
    measured_alpha = sum(trace[:2999]) / 2999
    assert pp / ppsd == pytest.approx(ppsd_speedup(measured_alpha, k), rel=0.01)


def test_the_simulator_runs_the_real_decoder(monkeypatch):
    """No copy of the schedule: a change to Decoder._pipelined changes the simulation."""
    from ppsd_ray.schedule import Decoder

    calls = []
    real = Decoder._pipelined
    monkeypatch.setattr(Decoder, "_pipelined", lambda self, *a: calls.append(1) or real(self, *a))
    simulate(Timing([1.0, 1.0], hop_s=0.0), [True] * 5, 5, window=2)
    assert calls == [1]


def test_rollback_skips_calls_that_had_not_started():
    # K=3, every draft rejected: ppsd degenerates to pp plus the stale calls already running
    timing = Timing([1.0, 1.0, 1.0], hop_s=0.0)
    sim = simulate(timing, [False] * 10, 10, window=3)
    assert sim.decode_s == pytest.approx(simulate(timing, [], 10, window=1).decode_s)
    assert all(len(calls) < 30 for calls in sim.calls)


def test_hops_cost_what_the_schedule_says():
    timing = Timing([2.0, 3.0], hop_s=0.5)
    pp = simulate(timing, [], 5, window=1)
    # the first input comes from the coordinator; each token crosses from stage 1 to 2, then goes
    # round the ring back to stage 1; the coordinator hears of the last one a hand-off after stage 2
    assert pp.decode_s == pytest.approx(0.5 + 5 * (5.0 + 0.5) + 4 * 0.5 + 0.5)
    assert calibrate_hop([2.0, 3.0], 5.0 + 2 * 0.5) == pytest.approx(0.5)
    assert decode_step_times([{"compute_s": 10.0, "prefill_s": 4.0, "stopped_s": 0.0, "calls": 4}]) == [2.0]
    # a call stopped between layers spent time but is not a step
    assert decode_step_times([{"compute_s": 11.5, "prefill_s": 4.0, "stopped_s": 1.5, "calls": 4}]) == [2.0]
