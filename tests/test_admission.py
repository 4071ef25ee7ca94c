"""Admission: sequence slots and the KV budget bound what decodes at once; the rest wait in order."""
import threading
import time

import pytest

from ppsd_ray.admission import Admission


def admit(adm: Admission, tokens: int) -> bool:
    """What the coordinator does, without its heartbeats: join, then wait for the turn."""
    return adm.wait(adm.join(tokens), timeout=5)


def test_requests_wait_for_slots_and_positions_in_arrival_order():
    adm = Admission(max_seqs=2, max_tokens=100)
    order = []
    assert admit(adm, 60) and admit(adm, 30)  # two slots, 90 positions

    def wait(name, tokens):
        assert admit(adm, tokens)
        order.append(name)

    big = threading.Thread(target=wait, args=("big", 50))
    big.start()
    time.sleep(0.1)
    small = threading.Thread(target=wait, args=("small", 5))  # fits, but waits behind the older request
    small.start()
    time.sleep(0.1)
    assert order == [] and adm.waiting == 2
    adm.release(30)  # a slot, but 60 + 50 > 100: nobody passes the older request
    time.sleep(0.1)
    assert order == []
    adm.release(60)
    big.join(2)
    small.join(2)
    assert order == ["big", "small"] and adm.seqs == 2 and adm.tokens == 55


def test_a_cancelled_wait_leaves_and_a_request_too_large_is_refused():
    adm = Admission(max_seqs=1, max_tokens=10)
    assert admit(adm, 10)
    ticket = adm.join(1)
    assert not adm.wait(ticket, timeout=0.1)  # no slot: its request is cancelled and leaves
    adm.leave(ticket)
    assert adm.waiting == 0
    with pytest.raises(ValueError, match="kv_budget_gb"):
        adm.join(11)
