"""A bounded probe loop on the control node: completions sent to every host's endpoint in rounds,
each answer recorded, so a rollout can be judged by who answered when (tests, bench)."""

import json
import ssl
import threading
import time
import urllib.error
import urllib.request


def completion(url, key, timeout=10, ca=None):
    """True when ``url``'s /v1/completions returns a completion for a two-token prompt with ``key``
    (an https URL checked against the CA file ``ca``)."""
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps({"prompt": "Hello", "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        context = ssl.create_default_context(cafile=ca) if url.startswith("https:") else None
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status == 200 and bool(json.load(response).get("choices"))
    except (OSError, ValueError, urllib.error.URLError):
        return False


class Prober(threading.Thread):
    """
    Every ``interval`` seconds, one round: a completion to each of ``targets`` (name -> base URL),
    in turn (https ones checked against ``ca``), until ``stop()`` or ``limit_s`` seconds (bounded). ``rounds``: ``(seconds since start,
    {name: answered})``.
    """

    def __init__(self, targets, key, interval=0.5, limit_s=1800, timeout=10, ca=None):
        super().__init__(daemon=True)
        self.targets, self.key, self.interval, self.limit_s, self.timeout = targets, key, interval, limit_s, timeout
        self.ca = ca
        self.rounds, self._halt = [], threading.Event()

    def run(self):
        start = time.monotonic()
        while not self._halt.is_set() and time.monotonic() - start < self.limit_s:
            at = time.monotonic() - start
            self.rounds.append(
                (at, {name: completion(url, self.key, self.timeout, self.ca) for name, url in self.targets.items()})
            )
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(self.timeout * len(self.targets) + 5)
        return self.rounds


def fewest_answering(rounds):
    """The fewest hosts that answered in any round."""
    return min(sum(answers.values()) for _, answers in rounds)


def out_of_service(rounds):
    """Per host, its out-of-service windows: ``[(from s, to s)]`` between the first round it did not
    answer and the next round it did (to the last round's time when it never came back)."""
    windows = {name: [] for name in (rounds[0][1] if rounds else {})}
    down_since = {}
    for at, answers in rounds:
        for name, answered in answers.items():
            if not answered and name not in down_since:
                down_since[name] = at
            elif answered and name in down_since:
                windows[name].append((down_since.pop(name), at))
    for name, since in down_since.items():
        windows[name].append((since, rounds[-1][0]))
    return windows


def longest_window(rounds):
    """The longest time any host was out of service, in seconds, and the host."""
    longest = (0.0, None)
    for name, spans in out_of_service(rounds).items():
        for start, end in spans:
            longest = max(longest, (end - start, name), key=lambda item: item[0])
    return longest
