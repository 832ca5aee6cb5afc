"""Asking another host while every host is prepared at once (pyinfra's greenlets): a question asked
once per run is worked out once however many hosts ask it at the same moment, and no more than
SLOTS questions are ever open on one host's connection (OpenSSH refuses channels past its
MaxSessions, 10: on 16 lab hosts the asked host failed the run, bench/scale.py)."""

import gevent

from operations.core import other_hosts


class Asked:
    """Another host: each fact takes a moment, and the most facts open on it at once is counted."""

    def __init__(self, name="lab-7"):
        self.name, self.state = name, object()
        self.open = self.most_open = self.asked = 0

    def get_fact(self, fact_class, **arguments):
        self.asked += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        gevent.sleep(0.01)
        self.open -= 1
        return {"fact": fact_class, **arguments}


def test_fifteen_hosts_asking_at_once_open_at_most_the_slots_on_its_connection():
    asked = Asked()
    askers = [gevent.spawn(other_hosts.fact_of, asked, "PctConfig", vmid=100 + n) for n in range(15)]
    gevent.joinall(askers, raise_error=True)
    assert [asker.value["vmid"] for asker in askers] == [100 + n for n in range(15)]
    assert asked.asked == 15 and asked.most_open == other_hosts.SLOTS < 10


def test_a_question_asked_by_fifteen_hosts_at_once_is_worked_out_once_per_run():
    asked = Asked("lab-9")
    askers = [
        gevent.spawn(other_hosts.answer, asked, "serves", lambda: asked.get_fact("SystemdStatus")) for _ in range(15)
    ]
    gevent.joinall(askers, raise_error=True)
    assert asked.asked == 1 and {asker.value["fact"] for asker in askers} == {"SystemdStatus"}
    asked.state = object()  # the next run asks again
    other_hosts.answer(asked, "serves", lambda: asked.get_fact("SystemdStatus"))
    assert asked.asked == 2


def test_a_failed_answer_reaches_every_asker_waiting_for_it():
    asked = Asked("lab-11")

    def frozen():
        gevent.sleep(0.01)
        raise OSError("lab-11: no answer within 20 s (gpufleet_liveness_timeout): taken as frozen")

    askers = [gevent.spawn(other_hosts.answer, asked, "pending", frozen) for _ in range(5)]
    gevent.joinall(askers)
    assert [type(asker.exception) for asker in askers] == [OSError] * 5
