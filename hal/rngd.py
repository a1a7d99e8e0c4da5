"""The rngd backend: the vendor's whole engine (``furiosa-llm-native``, extra ``[rngd]``) on RNGD cards.

The vendor exposes no step-level API: ``NativeLLMEngine`` owns batching and the KV cache on the
card. So this backend sits at the engine seam, not the queue seam. ``prepare`` checks everything
that can be checked off the card in milliseconds (the native wheel, refused knobs, the artifact,
``max_model_len`` against the FXB's buckets, the devices through ``furiosa_smi``); ``RngdRunner``
opens the vendor engine and pumps each request's stream on one asyncio loop in a background thread.

Stream protocol (``stream_generate(encoding, params, request_id)``, an async generator): each item is
a ``NativeRequestOutput`` whose ``outputs[0]`` (a ``NativeCompletionOutput``) carries the *new*
``token_ids`` of that step, their ``logprobs`` (per token, a list of ``(token_id, Logprob)``) and
``finish_reason`` on the last one; ``num_cached_tokens`` on the output. ``abort_request(id)`` ends a
stream; ``is_alive()`` turns False when the engine died.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .batch import TokenLogprob
from .devices import format_devices, parse_devices
from .rngd_artifact import Artifact, check_max_model_len, load_artifact
from .rngd_knobs import NATIVE_VERSION, NativeConfig, open_native, translate

logger = logging.getLogger("furiosa_llm.hal")


class RngdUnavailableError(ValueError):
    """RNGD cannot be used here: the wheel, the driver or a card is missing. The message says what to do."""


@dataclass(slots=True)
class NativeEncoding:
    """What ``stream_generate`` reads of a prompt (the shape of Hugging Face's ``BatchEncoding``)."""

    input_ids: list[int]
    attention_mask: list[int]


@dataclass(slots=True)
class NativeSamplingParams:
    """The attributes the 2026.4 binary reads of a request's sampling parameters (names from its string table)."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: Any = None
    reasoning_structured_outputs: Any = None
    kv_transfer_params: Any = None


@dataclass(slots=True)
class NativeDelta:
    """One item of a request's native stream, as our side sees it; ``at`` is ``time.monotonic()`` on receipt."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[list[TokenLogprob]] | None = None
    num_cached_tokens: int | None = None
    error: str | None = None
    at: float = 0.0


@dataclass(slots=True)
class RngdPlan:
    """Everything decided before the vendor engine is opened."""

    artifact: Artifact
    config: NativeConfig
    max_model_len: int | None


def native_factory() -> Callable[..., Any]:
    """``furiosa.llm_native.llm.NativeLLMEngine``; ``RngdUnavailableError`` without the ``[rngd]`` extra."""
    try:
        from furiosa.llm_native.llm import NativeLLMEngine  # type: ignore[import-not-found]
    except ImportError as e:
        raise RngdUnavailableError(f"devices: RNGD needs furiosa-llm-native {NATIVE_VERSION} ({e}); install the extra: "
                                   "pip install 'furiosa-llm-sim[rngd]'") from None
    return NativeLLMEngine


def resolve_devices(devices: str | None, smi=None) -> str:
    """The device string to open: ``devices`` checked against ``furiosa_smi``, or all available PEs when None."""
    from .discovery import _smi, available_npu_devices, check_available, describe_available, list_npu_cards

    smi = smi or _smi()
    if smi is None:
        raise RngdUnavailableError("devices: furiosa-smi is not installed, so no RNGD card can be found; install the "
                                   "extra: pip install 'furiosa-llm-sim[rngd]'")
    if not list_npu_cards(smi):
        why = ""
        try:
            smi.driver_info()
        except Exception as e:  # noqa: BLE001 - DeviceNotFoundError on a host without a card
            why = f" ({type(e).__name__}: {e})"
        raise RngdUnavailableError(f"devices={devices!r}: furiosa_smi finds no RNGD card on this host{why}; check that "
                                   "the card is installed and the RNGD driver loaded (furiosa-smi info), or use "
                                   f"another device; available: {describe_available(smi)}")
    if devices is None:
        found = available_npu_devices(smi)
        if not found:
            raise RngdUnavailableError("devices: every PE of every RNGD card is occupied; free some or wait")
        return format_devices(found)
    parsed = parse_devices(devices)
    check_available(parsed, smi)
    return format_devices(parsed)


def prepare(args: Any, *, smi=None) -> RngdPlan:
    """The off-card checks, in order: refused knobs, the devices, the artifact and its buckets. Milliseconds."""
    translate(args, devices="", fxb_path="")  # a refused knob is the first error
    devices = resolve_devices(args.devices, smi)
    art = load_artifact(args.model, fxb=getattr(args, "fxb", None))
    max_model_len = check_max_model_len(art, args.max_model_len)
    cfg = translate(args, devices=devices, fxb_path=str(art.fxb_path))
    cfg.ctor["max_model_len"] = max_model_len
    return RngdPlan(art, cfg, max_model_len)


def explain_native_error(e: BaseException) -> BaseException:
    """A vendor construction error as one a user can act on (the original is the ``__cause__``)."""
    msg = str(e)
    if "librenegade" in msg:
        return RngdUnavailableError(
            "no RNGD driver: the vendor engine reached device open but the driver library librenegade.so is not "
            "installed on this host (install the RNGD driver and firmware packages, then check with furiosa-smi "
            f"info); native error: {msg}")
    if "Not enough devices" in msg or "Incomplete chips" in msg or "must lie within" in msg:
        return ValueError(f"devices: the FXB's parallel layout does not fit the devices given; native error: {msg}")
    return e


class RngdRunner:
    """The vendor engine and one asyncio loop (thread ``rngd-pump``) that reads every request's stream.

    ``start`` opens a stream; ``poll`` returns what arrived; ``abort`` ends one stream at once.
    Thread-safe: ``start``/``abort``/``poll`` may be called from any thread.
    """

    def __init__(self, native: Any) -> None:
        self.native = native
        self._out: queue.Queue[NativeDelta] = queue.Queue()
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rngd-pump", daemon=True)
        self._thread.start()
        self._closed = False

    @classmethod
    def open(cls, plan: RngdPlan, factory: Callable[..., Any] | None = None) -> "RngdRunner":
        factory = factory or native_factory()
        try:
            native = open_native(factory, plan.config)
        except Exception as e:  # noqa: BLE001 - explained, then raised
            err = explain_native_error(e)
            if err is e:
                raise
            raise err from e
        return cls(native)

    def start(self, request_id: str, encoding: NativeEncoding, params: NativeSamplingParams) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._pump(request_id, encoding, params), self._loop)
        with self._lock:
            self._tasks[request_id] = fut
        fut.add_done_callback(lambda _f: self._forget(request_id, _f))

    def _forget(self, request_id: str, fut) -> None:
        with self._lock:
            if self._tasks.get(request_id) is fut:
                del self._tasks[request_id]

    async def _pump(self, rid: str, encoding: NativeEncoding, params: NativeSamplingParams) -> None:
        finished = False
        try:
            async for item in self.native.stream_generate(encoding, params, rid):
                comp = item.outputs[0]
                lps = None
                if comp.logprobs is not None:
                    lps = [[TokenLogprob(int(t), float(lp.logprob), lp.rank) for t, lp in step] for step in comp.logprobs]
                delta = NativeDelta(rid, list(comp.token_ids), comp.finish_reason, lps,
                                    getattr(item, "num_cached_tokens", None), at=time.monotonic())
                finished = comp.finish_reason is not None
                self._out.put(delta)
                if finished:
                    return
            if not finished:
                self._out.put(NativeDelta(rid, [], "error", error="the native stream ended without a finish reason",
                                          at=time.monotonic()))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - one request's failure ends that request only
            self._out.put(NativeDelta(rid, [], "error", error=f"{type(e).__name__}: {e}", at=time.monotonic()))

    def abort(self, request_id: str) -> None:
        """End ``request_id``'s stream: the vendor engine frees its KV blocks; later items are dropped."""
        with self._lock:
            fut = self._tasks.pop(request_id, None)
        try:
            self.native.abort_request(request_id)
        except Exception as e:  # noqa: BLE001 - an unknown or finished id
            logger.debug("native abort_request(%r): %s", request_id, e)
        if fut is not None:
            fut.cancel()

    def poll(self, timeout: float) -> list[NativeDelta]:
        """Everything that arrived, waiting up to ``timeout`` seconds for the first item."""
        try:
            items = [self._out.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._out.get_nowait())
            except queue.Empty:
                return items

    def is_alive(self) -> bool:
        try:
            return bool(self.native.is_alive())
        except Exception:  # noqa: BLE001 - a dead binding
            return False

    def metrics_text(self) -> str:
        """The vendor engine's Prometheus exposition (``get_prometheus_metrics``)."""
        return self.native.get_prometheus_metrics()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            ids = list(self._tasks)
        for rid in ids:
            self.abort(rid)
        try:
            self.native.shutdown()
        finally:
            async def cancel_all() -> None:  # let every pump see its cancellation before the loop stops
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(timeout=5)
            except Exception as e:  # noqa: BLE001 - shutting down regardless
                logger.debug("rngd pump shutdown: %r", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
