"""Routing among data-parallel replicas: one policy object for the simulator and the real engine.

A ``Router`` picks the replica a new request goes to and keeps the book it decides on: each
replica's live requests and their outstanding work in tokens. The simulator's frontend
(``furiosa_llm.sim.replica``) and the data-parallel front of the real engine
(``furiosa_llm.api.data_parallel``) drive the same classes through the same four calls, so a
simulated layout and a served one route alike:

- ``choose(cost, index=None, available=None) -> replica``: where a request of ``cost`` tokens goes;
- ``add(replica, request_id, cost)``: it went there;
- ``progress(request_id, prompt_done, new_tokens)``: its prompt was computed and/or tokens came out;
- ``finish(request_id)``: it ended (finished, aborted or failed);

``on_core_outputs(outputs)`` does the last two for a step's engine-core outputs.

A request's outstanding work is its prompt tokens until the first output, plus the output tokens
it may still generate (``max_tokens`` minus those generated). Ties go to the lowest replica index.
"""

from __future__ import annotations

from typing import Iterable

ROUTING_POLICIES = ("least_loaded", "least_tokens", "round_robin")


class Router:
    """The book of live requests per replica; subclasses say how ``choose`` reads it."""

    name = ""

    def __init__(self, num_replicas: int) -> None:
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas!r}: must be an int >= 1")
        self.num_replicas = num_replicas
        self.requests = [0] * num_replicas  # live requests per replica
        self.tokens = [0] * num_replicas  # outstanding tokens per replica
        self._live: dict[str, list] = {}  # request id -> [replica, prompt tokens left, output tokens left]
        self._next = 0

    def choose(self, cost: int = 0, index: int | None = None, available: Iterable[int] | None = None) -> int:
        raise NotImplementedError

    def _least(self, loads: list[int], available: Iterable[int] | None) -> int:
        cands = range(self.num_replicas) if available is None else sorted(available)
        if not cands:
            raise RuntimeError("no replica is available to take a request")
        return min(cands, key=loads.__getitem__)

    def add(self, replica: int, request_id: str, prompt_tokens: int, max_tokens: int) -> None:
        """Request ``request_id`` (``prompt_tokens`` in, up to ``max_tokens`` out) now runs on ``replica``."""
        self._live[request_id] = [replica, prompt_tokens, max_tokens]
        self.requests[replica] += 1
        self.tokens[replica] += prompt_tokens + max_tokens

    def progress(self, request_id: str, new_tokens: int) -> None:
        """``new_tokens`` output tokens of ``request_id`` came out (the first also means its prompt was computed)."""
        rec = self._live.get(request_id)
        if rec is None or new_tokens <= 0:
            return
        done = rec[1] + min(new_tokens, rec[2])
        rec[1], rec[2] = 0, max(0, rec[2] - new_tokens)
        self.tokens[rec[0]] -= done

    def on_core_outputs(self, outputs: Iterable) -> None:
        """``progress`` and ``finish`` for a step's ``CoreOutput``s (``request_id``, ``new_token_ids``,
        ``finish_reason``) in one pass: what a replica driving an ``EngineCore`` tells the router each step."""
        live, tokens = self._live, self.tokens
        for o in outputs:
            rec = live.get(o.request_id)
            if rec is None:
                continue
            new = len(o.new_token_ids)
            if new:
                left = rec[2]
                if rec[1] or new > left:  # the first output (the prompt is done) or past max_tokens
                    done = rec[1] + min(new, left)
                    rec[1], rec[2] = 0, max(0, left - new)
                    tokens[rec[0]] -= done
                else:
                    rec[2] = left - new
                    tokens[rec[0]] -= new
            if o.finish_reason is not None:
                self.finish(o.request_id)

    def finish(self, request_id: str) -> int | None:
        """``request_id`` ended; its remaining work leaves its replica's book. Returns that replica (None if unknown)."""
        rec = self._live.pop(request_id, None)
        if rec is None:
            return None
        self.requests[rec[0]] -= 1
        self.tokens[rec[0]] -= rec[1] + rec[2]
        return rec[0]

    def replica_of(self, request_id: str) -> int | None:
        rec = self._live.get(request_id)
        return None if rec is None else rec[0]

    def live_on(self, replica: int) -> list[str]:
        """The live request ids on ``replica``."""
        return [rid for rid, rec in self._live.items() if rec[0] == replica]


class LeastLoaded(Router):
    """The replica with the fewest live requests (running or waiting)."""

    name = "least_loaded"

    def choose(self, cost: int = 0, index: int | None = None, available: Iterable[int] | None = None) -> int:
        return self._least(self.requests, available)


class LeastOutstandingTokens(Router):
    """The replica with the least outstanding work in tokens (prompts not yet computed + outputs still to come)."""

    name = "least_tokens"

    def choose(self, cost: int = 0, index: int | None = None, available: Iterable[int] | None = None) -> int:
        return self._least(self.tokens, available)


class RoundRobin(Router):
    """Replica ``index % num_replicas`` (``index``: the request's position; a running count when None).

    When that replica is not ``available``, the next available one after it.
    """

    name = "round_robin"

    def choose(self, cost: int = 0, index: int | None = None, available: Iterable[int] | None = None) -> int:
        if index is None:
            index, self._next = self._next, self._next + 1
        r = index % self.num_replicas
        if available is None:
            return r
        avail = set(available)
        if not avail:
            raise RuntimeError("no replica is available to take a request")
        while r not in avail:
            r = (r + 1) % self.num_replicas
        return r


def make_router(policy: str, num_replicas: int) -> Router:
    """The ``Router`` named ``policy`` (one of ``ROUTING_POLICIES``) over ``num_replicas`` replicas."""
    classes = {c.name: c for c in (LeastLoaded, LeastOutstandingTokens, RoundRobin)}
    if policy not in classes:
        raise ValueError(f"routing policy {policy!r}: must be one of {', '.join(ROUTING_POLICIES)}")
    return classes[policy](num_replicas)
