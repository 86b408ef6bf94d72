"""The generation engine behind the server: one base model, several adapters, batched requests.

One worker thread owns the model (switching adapters is global state on a PeftModel, and a GPU runs one
decode step at a time anyway). Requests wait in a bounded queue.

With fast decoding (on by default on a GPU; `loraforge.infer.fast_decode.FastDecoder`) batching is
continuous: between two decode steps the worker admits waiting requests of the adapter in use (stock
`generate` prefills them, their keys join the static cache) and drops rows that ended (EOS, stop string,
`max_tokens`, cancellation, deadline), so a request that arrives mid-batch starts within a step instead of
waiting for the batch to finish. Each step replays the model's own kernels as CUDA graphs, attention
running eagerly between graph pieces over exactly the keys stock would see; greedy output equals stock
`generate`'s for one row (batched rows: see docs/serving.md). Requests of another adapter wait until the
rows in flight are done, then go first: admission is first come, first served per adapter. An idle engine
waits a few milliseconds for a burst of requests, so that they share one prefill.

Models the decoder does not cover (non-Llama, extra logits processors) are batched through `generate`:
the oldest request and every waiting request with the same adapter and sampling settings run as one
left-padded batch, and requests that arrive meanwhile wait for the next one.

A request with a `seed` or asking for logprobs runs alone, through a plain decode loop with its own
random generator (`Engine._generate_exact`): batch neighbours, the rows' order and other requests' draws
would otherwise change its tokens. So a seed gives the same answer for the same request and server, as
OpenAI's seed promises (best effort: another device or library version may round differently). It waits
for the rows in flight, like a request of another adapter, and holds the others while it runs.

Streaming: a decode step makes one token per row; text is handed to the event loop at most every
`stream_interval_s` (and at once for a first token or an ending), several tokens of a row merged into one
event — 16 streams at ~200 steps/s would otherwise be 3,200 wake-ups and SSE chunks a second.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import ModelLoadError
from loraforge.infer.fast_decode import FastDecoder, left_padded, supported
from loraforge.infer.generation import Decoding, encode, generate_kwargs, pad_id, stop_ids

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the client should retry later (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests (HTTP 503)."""


@dataclass
class Adapter:
    """A servable model name and how its prompts are rendered."""

    name: str
    peft_name: str | None  # None: the plain base model (no adapter)
    data_kind: str
    formatter: Any
    path: Path


@dataclass(eq=False)
class Request:
    """One generation; the worker thread fills `tokens` and posts events to `events` on the request's loop."""

    adapter: str
    input_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # set: sampled from its own generator seeded so (see _generate_exact)
    logprobs: int | None = None  # set: record each token's logprob and this many alternatives
    deadline: float = float("inf")  # time.monotonic() after which the request is abandoned
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None  # ("text", str) ... then ("done", finish_reason) or ("error", message)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finish_reason: str | None = None
    text: str = ""  # decoded so far (incrementally, see Engine._advance)
    stop_searched: int = 0  # text[:stop_searched] was searched for stop strings (see find_stop)
    prefix_offset: int = 0
    read_offset: int = 0
    outbox: list | None = None  # while set, events collect here and go to the loop in one call per step
    # per token of `tokens`: (logprob, [(alternative id, logprob), ...] most likely first), when logprobs is set
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Runs alone through `Engine._generate_exact` (a seed or logprobs)."""
        return self.seed is not None or self.logprobs is not None

    @property
    def group(self) -> tuple[Any, ...]:
        """Requests with equal groups can share one `generate` call (or one prefill); an exact one shares none."""
        if self.exact:
            return (self.adapter, id(self))
        return (self.adapter, self.temperature > 0, round(self.temperature, 4), round(self.top_p, 4))

    @property
    def stopped(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline

    def post(self, *event: Any) -> None:
        if self.loop is None or self.events is None:
            return
        if self.outbox is not None:
            self.outbox.append((self, event))
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the client is gone
            pass


def _deliver(items: list) -> None:
    for req, event in items:
        req.events.put_nowait(event)


def _merged(items: list) -> list:
    """Consecutive text events of one request become one (the rest keep their order)."""
    out: list = []
    last_text: dict[int, int] = {}  # id(req) -> index in out of its latest event, while that is text
    for req, event in items:
        i = last_text.get(id(req))
        if event[0] == "text" and i is not None:
            out[i] = (req, ("text", out[i][1][1] + event[1]))
            continue
        if event[0] == "text":
            last_text[id(req)] = len(out)
        else:
            last_text.pop(id(req), None)
        out.append((req, event))
    return out


def _flush(outbox: list) -> None:
    """One call_soon_threadsafe per event loop for everything collected since the last flush: waking the
    loop (and taking the GIL from the generating thread) once per flush instead of once per row and token."""
    by_loop: dict[Any, list] = {}
    for req, event in _merged(outbox):
        by_loop.setdefault(req.loop, []).append((req, event))
    outbox.clear()
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop is closed: the clients are gone
            pass


def find_stop(text: str, stops: list[str], searched: int) -> int:
    """Where the first stop string in `text` begins, or -1, given that `text[:searched]` was searched before
    (and held none). Only the new text and the longest stop's length minus one before it (a stop string may
    straddle the two) is searched, so a whole answer costs time linear in its length; searching all of it at
    every token was quadratic (a 1,000,000-character stop string held the worker for 37 s)."""
    start = max(0, searched - max(map(len, stops)) + 1)
    return min((at for s in stops if (at := text.find(s, start)) >= 0), default=-1)


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that is the beginning of a stop string (to hold back)."""
    longest = 0
    for s in stops:
        if len(s) < 2 or s.find(text[-1:], 0, len(s) - 1) < 0:  # usual: the last character is in no stop's head
            continue
        i = text.find(s[0], max(0, len(text) - len(s) + 1))
        while i >= 0 and len(text) - i > longest:  # the first (earliest) match is this stop's longest
            if s.startswith(text[i:]):
                longest = len(text) - i
                break
            i = text.find(s[0], i + 1)
    return longest


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """The next token from one row of logits: greedy at temperature 0, else temperature, the top-p nucleus
    (the most likely tokens whose probability reaches top_p, at least one), and a draw from `gen`."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before it already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=gen))


def _adapter_name(path: Path) -> str:
    path = Path(path).resolve()
    return path.parent.name if path.name == "adapter" and (path.parent / "config.yaml").is_file() else path.name


class Engine:
    """Loads the base once with every adapter of `runs`, then generates for submitted requests."""

    def __init__(self, runs: list[str | Path], *, max_batch: int = 8, max_waiting: int = 32,
                 batch_wait_s: float = 0.02, batch_wait_max_s: float = 0.1, device: str = "auto",
                 fast_decode: bool | None = None, stream_interval_s: float = 0.02,
                 trust_remote_code: bool = False) -> None:
        from loraforge.data.templates import load_user_template, prompt_formatter
        from loraforge.infer.load import load, locate

        if not runs:
            raise ModelLoadError("serve needs at least one run or adapter folder.")
        first = load(runs[0], device=device, trust_remote_code=trust_remote_code)
        self.model, self.tokenizer = first.model, first.tokenizer
        self.adapters: dict[str, Adapter] = {}
        base_name = self._base_name(runs[0])
        for i, run in enumerate(runs):
            name = _adapter_name(Path(run))
            if name in self.adapters:
                raise ModelLoadError(f"two served folders are both named {name!r}; the name is what clients put in "
                                     "'model', so rename one of the run folders.")
            if i == 0:
                peft_name = "default" if first.adapter_dir is not None else None
                self.adapters[name] = Adapter(name, peft_name, first.data_kind, first.formatter, Path(run))
                continue
            cfg, adapter_dir, facts = locate(run)
            if adapter_dir is None or first.adapter_dir is None:
                raise ModelLoadError(f"{run}: only adapters can be served beside another model; every folder "
                                     "after the first must be a run or adapter folder of the same base.")
            if self._base_name(run) != base_name:
                raise ModelLoadError(f"{run} was trained on {self._base_name(run)!r}, but the server's base is "
                                     f"{base_name!r}; serve adapters of different bases from separate servers.")
            peft_name = f"adapter_{i}"
            try:
                self.model.load_adapter(str(adapter_dir), adapter_name=peft_name, is_trainable=False)
            except Exception as e:  # noqa: BLE001 - one clear message for a mismatched adapter
                raise ModelLoadError(f"cannot load the adapter in {adapter_dir}: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:300]}") from e
            kind = facts.get("data_kind", "chat")
            template = load_user_template(cfg.data.template) if cfg is not None else None
            system = cfg.data.system_prompt if cfg is not None else None
            formatter = prompt_formatter(kind, self.tokenizer, template, system)
            self.adapters[name] = Adapter(name, peft_name, kind, formatter, Path(run))
        self.model.eval()
        self.eos_ids = stop_ids(self.model, self.tokenizer)
        self.pad_id = pad_id(self.tokenizer, self.eos_ids)
        self.device = next(self.model.parameters()).device
        # None = where it pays: a GPU (graphs); on a CPU the same decoder runs its pieces eagerly (tests)
        self.fast_decode = self.device.type == "cuda" if fast_decode is None else fast_decode
        self.decoder = None
        if self.fast_decode:
            ok, why = supported(self.model)
            if ok:
                # merged_batches=None: batches decode from merged weights where they fit (FastDecoder's rule)
                self.decoder = FastDecoder(self.model, max_rows=max_batch, bucket_rows=True, attention="no-plans",
                                           merged_batches=None)
                self.decoder.warm_up(key=next(iter(self.adapters)))
                log.info("fast decoding: graphs %s, batches from merged weights: %s", self.decoder.graphs,
                         {True: "always", False: "never", None: "where they fit"}[self.decoder.merged_batches])
            else:
                log.warning("fast decoding off (%s): batches run through generate()", why)
                self.fast_decode = False
        self.stream_interval_s = stream_interval_s
        self.max_batch, self.max_waiting, self.batch_wait_s = max_batch, max_waiting, batch_wait_s
        self.batch_wait_max_s = max(batch_wait_max_s, batch_wait_s)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cv = threading.Condition()
        self._stopping = False
        # recent batch sizes, for /health: rows decoding after each admission (fast), or generate() batches
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self._thread = threading.Thread(target=self._work, name="loraforge-generate", daemon=True)
        self._thread.start()

    @staticmethod
    def _base_name(run: str | Path) -> str:
        import json

        from loraforge.infer.load import locate

        cfg, adapter_dir, _ = locate(run)
        if cfg is not None:
            return cfg.model.model_name
        if adapter_dir is not None:
            adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
            return adapter_cfg.get("base_model_name_or_path", "")
        return str(run)

    # ---------------------------------------------------------------------------------------------------
    # Requests

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def submit(self, req: Request) -> None:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(req)
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, end the waiting ones, let the running batch finish (or cancel it at `timeout`)."""
        with self._cv:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cv.notify_all()
        for req in waiting:
            req.post("error", "the server is shutting down")
        self._thread.join(timeout)
        if self._thread.is_alive():
            for req in list(self._running):
                req.cancelled = True
            self._thread.join(5.0)

    # ---------------------------------------------------------------------------------------------------
    # Worker

    def _work(self) -> None:
        if self.decoder is not None:
            self._work_rows()
        else:
            self._work_batches()

    def _wait_for_work(self, busy: bool) -> bool:
        """Blocks until there is something to do; False when the worker should end."""
        with self._cv:
            while not self._waiting and not busy and not self._stopping:
                self._cv.wait()
            return busy or not self._stopping

    def _work_rows(self) -> None:
        """Continuous batching on the fast decoder: admit, step, deliver, drop ended rows; repeat."""
        running: list[Request] = []
        outbox: list = []
        last_flush = 0.0
        while self._wait_for_work(bool(running)):
            if not running:
                with self._cv:
                    few = 0 < len(self._waiting) < self.max_batch
                if few:  # an idle engine gives a burst a moment, so it shares one prefill
                    self._gather()
            flush_now = False
            for req in self._admit(running):
                req.outbox = outbox
                running.append(req)
            if running:
                try:
                    done = self.decoder.step()
                except Exception as e:  # noqa: BLE001 - reported to the clients; the worker keeps serving
                    self._fail(running, e)
                    done = []
                for step in done:
                    for req, token in step:
                        if req.finish_reason is None and not req.stopped:
                            fresh = not req.sent
                            self._advance(req, token)
                            flush_now |= fresh and bool(req.sent)
            ended = []
            for req in running:
                if req.finish_reason is None and req.stopped:
                    self._finish(req, "cancelled" if req.cancelled else "timeout")
                if req.finish_reason is not None:
                    ended.append(req)
            now = time.monotonic()
            if ended or flush_now or now - last_flush >= self.stream_interval_s:
                _flush(outbox)
                last_flush = now
            for req in ended:
                self.decoder.leave(req)
                running.remove(req)
                req.outbox = None
            self._running = list(running)

    def _admit(self, running: list[Request]) -> list[Request]:
        """Prefills waiting requests into free rows: those of the adapter in use (or, with no rows
        decoding, of the oldest request's), in arrival order up to the first request of another adapter —
        so that one waits only for the rows ahead of it. Returns the requests that joined."""
        with self._cv:
            live = [r for r in self._waiting if not r.cancelled]
            adapter = running[0].adapter if running else (live[0].adapter if live else None)
            take: list[Request] = []
            for req in live:
                if req.adapter != adapter or req.exact or len(running) + len(take) >= self.max_batch:
                    break
                take.append(req)
            if not running and not take and live and live[0].exact:  # its turn, and no rows decoding
                exact = live[0]
                self._waiting = deque(live[1:])
                self._running = [exact]
            else:
                exact = None
                taken = set(map(id, take))
                self._waiting = deque(r for r in live if id(r) not in taken)
                self._running = running + take
        if exact is not None:
            self._run_exact(exact)
            return []
        if not take:
            return []
        if not running and self.adapters[adapter].peft_name is not None:
            self.model.set_adapter(self.adapters[adapter].peft_name)
        joined: list[Request] = []
        groups: dict[tuple, list[Request]] = {}
        for req in take:
            groups.setdefault(req.group, []).append(req)
        for group in groups.values():  # one prefill per sampling setting
            ids, mask = left_padded([r.input_ids for r in group], self.pad_id)
            first = group[0]
            try:
                tokens = self.decoder.join(ids, mask, group, [r.max_tokens for r in group],
                                           temperature=first.temperature, top_p=first.top_p, key=adapter)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for a long prompt: these requests fail
                self._fail(group, e)
                continue
            for req, token in zip(group, tokens, strict=True):
                req.outbox = None  # the first token goes out at once
                self._advance(req, token)
            joined += group
        self.batch_sizes.append(len(running) + len(joined))
        return joined

    def _fail(self, reqs: list[Request], error: Exception) -> None:
        """Ends these requests with an error event (the worker keeps serving the others)."""
        for req in reqs:
            if req.finish_reason is None:
                req.finish_reason = "error"
                req.post("error", f"generation failed: {type(error).__name__}: {str(error)[:300]}")
            if self.decoder is not None:
                self.decoder.leave(req)

    def _work_batches(self) -> None:
        """Batches through `generate` (models the fast decoder does not cover)."""
        while self._wait_for_work(False):
            with self._cv:
                few = len(self._waiting) < self.max_batch
            if few:  # give concurrent requests a moment to join this batch
                self._gather()
            with self._cv:
                live = [r for r in self._waiting if not r.cancelled]
                if not live:
                    self._waiting.clear()
                    continue
                group = live[0].group
                batch = [r for r in live if r.group == group][: self.max_batch]
                taken = set(map(id, batch))
                self._waiting = deque(r for r in live if id(r) not in taken)
                self._running = batch
            if batch[0].exact:  # its group is its own: the batch is this one request
                self._run_exact(batch[0])
                self._running = []
                continue
            adapter = self.adapters[batch[0].adapter]
            if adapter.peft_name is not None:
                self.model.set_adapter(adapter.peft_name)
            self.batch_sizes.append(len(batch))
            try:
                self._generate_plain(batch)
            except Exception as e:  # noqa: BLE001 - reported to the clients; the worker keeps serving
                self._fail(batch, e)
            finally:
                self._running = []

    def _gather(self) -> None:
        """Wait `batch_wait_s`, and again as long as requests keep arriving (a burst of clients whose
        connections land a few milliseconds apart), up to `batch_wait_max_s` or a full batch. A lone
        request waits one `batch_wait_s`; a burst of 16 becomes one batch instead of two or three run
        one after the other (measured: bench/results/serve-diag-*.json)."""
        deadline = time.monotonic() + self.batch_wait_max_s
        with self._cv:
            seen = len(self._waiting)
        while True:
            time.sleep(self.batch_wait_s)
            with self._cv:
                now = len(self._waiting)
            if now >= self.max_batch or now == seen or time.monotonic() >= deadline:
                return
            seen = now

    def _generate_plain(self, batch: list[Request]) -> None:
        """transformers' `generate` with a streamer: every model, any device."""
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        engine = self
        ids, mask = left_padded([r.input_ids for r in batch], self.pad_id)
        max_new = max(r.max_tokens for r in batch)
        outbox: list = []

        class RowStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # the first call carries the prompt
                    self.prompt_seen = True
                    return
                for req, token in zip(batch, value.reshape(-1).tolist(), strict=True):
                    if req.finish_reason is None:
                        req.outbox = outbox
                        engine._advance(req, token)
                        req.outbox = None
                _flush(outbox)

            def end(self) -> None:
                for req in batch:
                    if req.finish_reason is None:
                        engine._finish(req, "length")

        class RowsDone(StoppingCriteria):
            def __init__(self) -> None:
                self.last: tuple[list[bool], torch.Tensor] | None = None

            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                now = time.monotonic()
                for req in batch:
                    if req.finish_reason is None and (req.cancelled or now > req.deadline):
                        engine._finish(req, "cancelled" if req.cancelled else "timeout")
                done = [r.finish_reason is not None for r in batch]
                if self.last is None or self.last[0] != done:  # a copy to the device only when a row ends
                    self.last = (done, torch.tensor(done, device=input_ids.device))
                return self.last[1]

        first = batch[0]  # the batch shares its sampling settings (Request.group)
        decoding = Decoding.from_temperature(first.temperature, first.top_p, max_new)
        with torch.no_grad():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                streamer=RowStreamer(), stopping_criteria=StoppingCriteriaList([RowsDone()]),
                                **generate_kwargs(self.model, self.tokenizer, decoding))

    def _run_exact(self, req: Request) -> None:
        adapter = self.adapters[req.adapter]
        if adapter.peft_name is not None:
            self.model.set_adapter(adapter.peft_name)
        self.batch_sizes.append(1)
        try:
            self._generate_exact(req)
        except Exception as e:  # noqa: BLE001 - reported to the client; the worker keeps serving
            self._fail([req], e)
        finally:
            self._running = []

    def _generate_exact(self, req: Request) -> None:
        """One request, one row, its own generator: the tokens depend on the request and the seed only.

        A plain loop over the model with its KV cache (batch 1 needs no mask or positions). Logprobs are
        the model's distribution, log-softmax of the logits before temperature and top-p (as vLLM reports
        them), so they do not depend on the sampling settings."""
        gen = torch.Generator(device=self.device)
        if req.seed is not None:
            gen.manual_seed(req.seed % 2**64)  # manual_seed takes 0..2^64-1; OpenAI's seed may be negative
        else:
            gen.seed()
        ids = torch.tensor([req.input_ids], device=self.device)
        past = None
        with torch.no_grad():
            while req.finish_reason is None:
                if req.stopped:
                    self._finish(req, "cancelled" if req.cancelled else "timeout")
                    break
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
                token = _pick(logits, req.temperature, req.top_p, gen)
                if req.logprobs is not None and token not in self.eos_ids:  # OpenAI lists no end token
                    logprobs = logits.log_softmax(-1)
                    top = logprobs.topk(req.logprobs) if req.logprobs else None
                    alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []
                    req.token_logprobs.append((float(logprobs[token]), alternatives))
                self._advance(req, token)
                ids = torch.tensor([[token]], device=self.device)

    def token_text(self, token: int) -> str:
        """One token's text as it decodes alone (half a UTF-8 character shows as U+FFFD)."""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _advance(self, req: Request, token: int) -> None:
        if token in self.eos_ids:
            self._finish(req, "stop")
            return
        req.tokens.append(token)
        text = self._detokenize(req)
        if req.stop:
            at = find_stop(text, req.stop, req.stop_searched)
            req.stop_searched = len(text)
            if at >= 0:
                self._send(req, text[:at])
                req.finish_reason = "stop"
                req.post("done", "stop")
                return
        if len(req.tokens) >= req.max_tokens:
            self._send(req, text)
            self._finish(req, "length")
            return
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        # Hold back a tail that could be the start of a stop string, so no part of one is ever sent.
        self._send(req, text[: len(text) - stop_prefix_len(text, req.stop)])

    def _detokenize(self, req: Request) -> str:
        """The text of req.tokens, decoding only a short window per new token.

        Decoding the whole sequence at every step costs O(n) per token. Instead decode the tokens from
        `prefix_offset` (a few tokens of left context, so a tokenizer that merges spaces or bytes across
        tokens decodes them the same way) and append what they add beyond the text of the context alone;
        a trailing U+FFFD (half a UTF-8 character) waits for the next token. `_finish` sends the full
        decode at the end, so nothing held back is lost.
        """
        decode = self.tokenizer.decode
        prefix = decode(req.tokens[req.prefix_offset:req.read_offset], skip_special_tokens=True)
        new = decode(req.tokens[req.prefix_offset:], skip_special_tokens=True)
        if len(new) > len(prefix) and not new.endswith("\ufffd") and new.startswith(prefix):
            req.text += new[len(prefix):]
            req.prefix_offset, req.read_offset = req.read_offset, len(req.tokens)
        elif not new.startswith(prefix):  # the window re-tokenized its left context: decode in full
            req.text = decode(req.tokens, skip_special_tokens=True)
            req.prefix_offset = req.read_offset = len(req.tokens)
            req.stop_searched = 0  # text already searched may have changed (rare): search it again
            return req.text
        return req.text  # tokens not yet committed (half a character, no text yet) wait for the next

    def _send(self, req: Request, text: str) -> None:
        if text.startswith(req.sent) and len(text) > len(req.sent):
            req.post("text", text[len(req.sent):])
            req.sent = text

    def _finish(self, req: Request, reason: str) -> None:
        if req.finish_reason is None:
            if reason in ("stop", "length"):  # flush a held-back tail
                self._send(req, self.tokenizer.decode(req.tokens, skip_special_tokens=True))
            req.finish_reason = reason
            req.post("done", reason)
