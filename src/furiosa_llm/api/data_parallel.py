"""DataParallelEngine: N engine replicas as Ray actors behind one ``native_engine``.

``--data-parallel-size N`` (N > 1) on the torch backend makes ``AsyncLLMEngine.from_engine_args``
build this front instead of one ``NativeEngine``. Each replica is a Ray actor
(``replica_actor.EngineReplica``) running the unchanged ``NativeEngine`` on its own device with its
own KV cache. The front has the native engine's methods (``add_request``, ``step``,
``abort_request``, ``has_unfinished_requests``, ``stats``, ``shutdown``), so ``AsyncLLMEngine``,
``LLMEngine`` and the server drive it as they drive one engine.

- Routing: a ``furiosa_llm.core.routing.Router`` (default ``least_tokens``: the replica with the
  least outstanding work in tokens; the simulator's ``--dispatch`` takes the same policies and
  objects). The front validates and tokenizes a request to know its cost, then adds it to the
  chosen actor (which tokenizes it again: the price of keeping the replica's engine unchanged).
- Stepping: the front keeps one ``step`` call in flight per replica that has live requests and
  returns the outputs of whichever replicas answered; outputs stream back as the replica makes them.
- Faults: a replica whose actor dies, or whose engine steps keep failing (``EngineDeadError``),
  ends its own live requests with finish reason "error" (``RequestFailedError`` in ``generate``);
  Ray restarts the actor (``max_restarts=-1``; a failing engine's actor is killed to be restarted)
  and the replica takes requests again once it answers. The other replicas keep serving.
- Devices: ``cpu`` (every replica on the CPU, ``cpu_count // N`` torch threads each, 1 CPU of Ray's
  each) or one ``cuda`` device per replica (each actor asks Ray for one GPU and runs on the one Ray
  gives it, so ``cuda:0,cuda:1`` means "two GPUs").
- Ray: connected with ``furiosa_llm.api.distributed.connect(None)``: ``RAY_ADDRESS`` when set, else a
  local Ray; an existing connection is reused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any

from furiosa_llm.core import EngineStats
from furiosa_llm.core.routing import make_router

from .engine_args import EngineArgs
from .input_processor import InputProcessor
from .outputs import CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("furiosa_llm")

WAIT_S = 0.02  # how long one front step waits for a replica's step before looking again (new requests, restarts)
CALL_TIMEOUT_S = 30.0  # add/abort calls to an actor


def replica_devices(args: EngineArgs) -> list[str | None]:
    """Each replica's device string: ``cpu`` (or the default device) for all, or one ``cuda`` per replica.

    ``ValueError`` naming ``devices`` and ``data_parallel_size`` when the devices do not split so.
    """
    n = args.data_parallel_size or 1
    devs = args.parsed_devices()
    if devs is None:
        return [None] * n
    kinds = {d.kind for d in devs}
    if kinds == {"cpu"}:
        return ["cpu"] * n
    if kinds == {"cuda"} and len(devs) == n:
        return [str(d) for d in devs]
    raise ValueError(f"devices={args.devices!r} with data_parallel_size={n}: give 'cpu' (every replica on the CPU) "
                     f"or exactly {n} cuda devices, one per replica (e.g. 'cuda:0,cuda:1')")


@dataclasses.dataclass
class _Replica:
    index: int
    actor: Any
    device: str | None
    step_ref: Any = None  # the step call in flight
    ready_ref: Any = None  # while restarting: a ping that answers once the actor is back
    stats: EngineStats | None = None
    routed: int = 0
    failed: int = 0
    restarts: int = 0

    @property
    def available(self) -> bool:
        return self.ready_ref is None


class DataParallelEngine:
    """``data_parallel_size`` ``NativeEngine`` replicas as Ray actors, one routing front (module doc).

    ``routing``: a policy of ``furiosa_llm.core.routing.ROUTING_POLICIES``. ``ValueError`` for a bad
    policy or device split; ``ImportError`` when Ray is not installed.
    """

    def __init__(self, args: EngineArgs, *, routing: str = "least_tokens", num_threads: int | None = None) -> None:
        from furiosa_llm.api.distributed import connect

        n = args.data_parallel_size or 1
        if n < 2:
            raise ValueError(f"data_parallel_size={n}: the data-parallel front needs at least 2 replicas")
        devices = replica_devices(args)
        self.router = make_router(routing, n)
        self.ray = ray = connect(None)
        from .replica_actor import EngineReplica

        cpu = all(d in (None, "cpu") for d in devices)
        if cpu and num_threads is None:
            num_threads = max(1, (os.cpu_count() or 1) // n)
        actor_cls = ray.remote(EngineReplica).options(num_cpus=1, num_gpus=0 if cpu else 1, max_restarts=-1,
                                                      max_task_retries=0, max_concurrency=4)
        self.args = args
        self.replicas = []
        for i, dev in enumerate(devices):
            rargs = dataclasses.replace(args, data_parallel_size=1, devices=dev if cpu else "cuda:0")
            self.replicas.append(_Replica(i, actor_cls.remote(rargs, i, num_threads if cpu else None), dev))
        infos = ray.get([r.actor.info.remote() for r in self.replicas])  # waits for every model to load
        info = infos[0]
        self.tokenizer = info["tokenizer"]
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        self.eos_token_ids = info["eos_token_ids"]
        self.task = info["task"]
        self.hidden_size = info["hidden_size"]
        self.pooling_config = info["pooling_config"]
        self.default_sampling_kwargs = info["default_sampling_kwargs"]
        self.engine_config = info["engine_config"]
        self.device = info["device"]
        self.load_seconds = max(i["load_seconds"] for i in infos)
        self.input_processor = InputProcessor(self.tokenizer, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                                              max_logprobs=args.max_logprobs, eos_token_ids=self.eos_token_ids)
        self._lock = threading.Lock()
        self._requests: dict[str, list] = {}  # request id -> [kind, prompt token ids, output kind, tokens seen]
        self._ended_here: list = []  # final outputs made by the front (a failed replica), for the next step
        self._closed = False
        logger.info("data-parallel front: %d replicas (%s) on Ray, routing %s", n,
                    ", ".join(i["device"] for i in infos), self.router.name)

    # ---- the native engine's interface ----------------------------------------------------------
    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.default_sampling_kwargs)

    def get_diff_sampling_param(self) -> dict[str, Any]:
        return dict(self.default_sampling_kwargs)

    def add_request(self, request_id: str, prompt, params=None, arrival_time: float | None = None) -> None:
        """Validate and count the request here, then queue it on the chosen replica. ``ValueError`` for bad input."""
        self._check_open()
        if self.task == "embed":
            self.add_pooling_request(request_id, prompt, params, arrival_time=arrival_time)
            return
        _text, sp, req = self.input_processor.process(request_id, prompt, params, arrival_time)
        self._route(request_id, ["generate", req.prompt_token_ids, sp.output_kind, 0], len(req.prompt_token_ids),
                    req.max_tokens, lambda a: a.add_request.remote(request_id, prompt, params, arrival_time))

    def add_pooling_request(self, request_id: str, prompt, params=None, *, truncate_prompt_tokens: int | None = None,
                            arrival_time: float | None = None) -> None:
        self._check_open()
        if self.task != "embed":
            raise ValueError(f"encode(): model {self.args.model!r} is a generative model (task 'generate'); pooling "
                             "needs an embedding model (e.g. all-minilm-l6-v2)")
        _t, _p, req = self.input_processor.process_pooling(
            request_id, prompt, params, hidden_size=self.hidden_size, pooling_type=self.pooling_config.pooling_type,
            truncate_prompt_tokens=truncate_prompt_tokens, arrival_time=arrival_time)
        self._route(request_id, ["pool", req.prompt_token_ids, None, 0], len(req.prompt_token_ids), 0,
                    lambda a: a.add_pooling_request.remote(request_id, prompt, params, truncate_prompt_tokens,
                                                           arrival_time))

    def _route(self, request_id: str, record: list, prompt_tokens: int, max_tokens: int, call) -> None:
        ray = self.ray
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request_id={request_id!r}: a live request already has this id")
        tried: set[int] = set()
        deadline = time.monotonic() + 120.0
        while True:
            with self._lock:
                self._poll_restarts(0)
                avail = [r.index for r in self.replicas if r.available and r.index not in tried]
                if avail:
                    i = self.router.choose(prompt_tokens + max_tokens, available=avail)
                    # booked before the call, so concurrent adds see this load
                    self.router.add(i, request_id, prompt_tokens, max_tokens)
                    self._requests[request_id] = record
            if not avail:
                if time.monotonic() > deadline:
                    raise RuntimeError("no data-parallel replica is serving (all are restarting)")
                tried.clear()
                self._poll_restarts(1.0)
                continue
            r = self.replicas[i]
            try:
                ray.get(call(r.actor), timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayTaskError as e:  # the replica refused the request: its own error
                self._forget(request_id)
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else RuntimeError(str(e))) from None
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                self._forget(request_id)
                self._replica_failed(r, e)  # its other requests end with the next step
                tried.add(i)
                continue
            with self._lock:
                r.routed += 1
            return

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self.router.finish(request_id)
            self._requests.pop(request_id, None)

    def abort_request(self, request_id: str | list[str]) -> list:
        """Abort live requests on their replicas; returns their final outputs (made here for a dead replica)."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        by_replica: dict[int, list[str]] = {}
        with self._lock:
            for rid in ids:
                i = self.router.replica_of(rid)
                if i is not None:
                    by_replica.setdefault(i, []).append(rid)
        outs: list = []
        for i, rids in by_replica.items():
            r = self.replicas[i]
            got = None
            if r.available:
                try:
                    got = self.ray.get(r.actor.abort_request.remote(rids), timeout=CALL_TIMEOUT_S)
                except self.ray.exceptions.RayError:
                    got = None
            if got is None:
                got = [o for o in (self._ended(rid, "abort", None) for rid in rids) if o is not None]
            outs.extend(got)
            for rid in rids:
                self._forget(rid)
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests or self._ended_here)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def step(self) -> list:
        """The outputs of the replicas whose step finished (waits up to ``WAIT_S``); failed replicas' requests end."""
        ray = self.ray
        with self._lock:
            outs, self._ended_here = self._ended_here, []
            for r in self.replicas:
                if r.step_ref is None and r.available and self.router.requests[r.index] > 0:
                    r.step_ref = r.actor.step.remote()
            refs = {r.step_ref: r for r in self.replicas if r.step_ref is not None}
        if not refs:
            if not outs:
                self._poll_restarts(WAIT_S)
            return outs
        ready, rest = ray.wait(list(refs), num_returns=1, timeout=WAIT_S)
        if ready and rest:  # and whatever else is done by now
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in ready:
            r = refs[ref]
            r.step_ref = None
            try:
                got, stats = ray.get(ref)
            except ray.exceptions.RayError as e:  # the actor died, or its engine is dead
                self._replica_failed(r, e)
                continue
            r.stats = stats
            outs.extend(self._book(got))
        with self._lock:
            outs, self._ended_here = outs + self._ended_here, []
        return outs

    def _book(self, outputs: list) -> list:
        """Tell the router what each output means for its request's outstanding work."""
        with self._lock:
            for o in outputs:
                rec = self._requests.get(o.request_id)
                if rec is None:
                    continue
                if rec[0] == "generate" and o.outputs:
                    n = len(o.outputs[0].token_ids)
                    new = n if rec[2] == RequestOutputKind.DELTA else n - rec[3]
                    rec[3] = n if rec[2] != RequestOutputKind.DELTA else rec[3] + n
                    self.router.progress(o.request_id, new)
                if o.finished:
                    self.router.finish(o.request_id)
                    self._requests.pop(o.request_id, None)
        return outputs

    def _replica_failed(self, r: _Replica, error: BaseException) -> None:
        """End ``r``'s live requests with an error (outputs of the next ``step``); Ray brings its actor back."""
        ray = self.ray
        msg = f"data-parallel replica {r.index} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        with self._lock:
            if r.ready_ref is not None:
                return
            logger.error("%s; ending its %d live request(s) and restarting it", msg, self.router.requests[r.index])
            if not isinstance(error, ray.exceptions.RayActorError):  # alive but broken (e.g. engine dead): restart
                try:
                    ray.kill(r.actor, no_restart=False)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            r.step_ref = None
            r.restarts += 1
            r.ready_ref = r.actor.ping.remote()
            for rid in self.router.live_on(r.index):
                out = self._ended(rid, "error", msg)
                self.router.finish(rid)
                self._requests.pop(rid, None)
                r.failed += 1
                if out is not None:
                    self._ended_here.append(out)

    def _poll_restarts(self, timeout: float) -> None:
        """Mark replicas whose restarted actor answers as available again."""
        waiting = {r.ready_ref: r for r in self.replicas if r.ready_ref is not None}
        if not waiting:
            if timeout:
                time.sleep(timeout)
            return
        ready, _ = self.ray.wait(list(waiting), num_returns=len(waiting), timeout=timeout)
        for ref in ready:
            r = waiting[ref]
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayError:
                r.ready_ref = r.actor.ping.remote()  # still coming back
                continue
            r.ready_ref = None
            logger.info("data-parallel replica %d is serving again (restart %d)", r.index, r.restarts)

    def _ended(self, request_id: str, reason: str, error: str | None):
        """The final output of a request ended here, not by its replica (dead replica)."""
        rec = self._requests.get(request_id)
        if rec is None:
            return None
        if rec[0] == "pool":
            return PoolingRequestOutput(request_id, PoolingOutput(None), rec[1], True, error=error,
                                        aborted=reason == "abort")
        return RequestOutput(request_id, None, rec[1], None, [CompletionOutput(0, "", [], finish_reason=reason)], True,
                             error=error)

    # ---- state ------------------------------------------------------------------------------
    def replica_stats(self) -> list[dict]:
        """Per replica: its index, device, ``EngineStats``, requests routed/failed/live, outstanding tokens, restarts."""
        self.stats()  # refreshes the idle replicas' snapshots
        with self._lock:
            return [{"replica": r.index, "device": r.device, "stats": r.stats, "routed": r.routed, "failed": r.failed,
                     "restarts": r.restarts, "available": r.available, "live": self.router.requests[r.index],
                     "outstanding_tokens": self.router.tokens[r.index]} for r in self.replicas]

    def stats(self) -> EngineStats:
        """The replicas' ``EngineStats`` summed (``jit``: None over several replicas).

        Each serving replica is asked now; one that is restarting counts with its last report.
        """
        idle = [r for r in self.replicas if r.available]  # the actor is threaded: it answers while it steps
        if idle:
            try:
                for r, st in zip(idle, self.ray.get([r.actor.stats.remote() for r in idle], timeout=CALL_TIMEOUT_S)):
                    r.stats = st
            except self.ray.exceptions.RayError:  # a dying replica: its last report stands
                pass
        snaps = [r.stats for r in self.replicas if r.stats is not None]
        fields = [f.name for f in dataclasses.fields(EngineStats) if f.name != "jit"]
        return EngineStats(**{k: sum(getattr(s, k) for s in snaps) for k in fields}, jit=None)

    @property
    def num_free_blocks(self) -> int:
        st = self.stats()
        return st.num_kv_blocks_total - st.num_kv_blocks_used

    @property
    def num_total_blocks(self) -> int:
        return self.stats().num_kv_blocks_total

    def is_alive(self) -> bool:
        return not self._closed and any(r.available for r in self.replicas)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is shut down (shutdown() was called); create a new one to serve requests")

    def shutdown(self) -> None:
        """Abort every live request and end the replicas' actors; a second call does nothing."""
        if self._closed:
            return
        self.abort_request(list(self._requests))
        self._closed = True
        for r in self.replicas:
            try:
                self.ray.kill(r.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
