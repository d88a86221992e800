"""Continuous batching for `loralab serve`: one base model, any number of LoRA adapters, one
forward pass for the rows of a batch whose requests each name their own adapter.

Why by hand: `generate()` streams only at batch size 1 and runs one adapter per call, and
llama-server, which batches continuously, does not batch requests that use different adapters
together. Here a request joins the running batch at the next decode step (after its own prefill,
cut into chunks of `prefill_chunk` tokens with a decode step of the running rows between chunks, so
a long prompt does not stall them), a finished row leaves at once, and every row goes through its
own adapter (PEFT's `adapter_names`: the base weights are shared and never reloaded) and streams
its text as it is produced.

The batch's KV cache is left-padded: each row's tokens end at the last column, padding columns are
masked out, and each row keeps its own position ids, so a row's answer is the one it would get
alone. Columns that only finished rows used are dropped when those rows leave.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from loralab.deploy.serve.metrics import ServeMetrics
from loralab.deploy.serve.protocol import Event

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class QueueFull(Exception):
    pass


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    max_tokens: int
    emit: Callable[[Event], None]  # called from the engine thread: text as it is produced, then the finish
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always produce max_tokens (as vLLM's extension of the API)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


class Row:
    """Decoding state of one request: generated ids, text emitted so far, why it stopped."""

    def __init__(self, request: Request, tokenizer):
        self.request = request
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0
        self.finish: str | None = None
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may still be forming
        self.generator = None
        if request.temperature > 0:
            self.generator = torch.Generator().manual_seed(request.seed if request.seed is not None else
                                                           int(time.time_ns()) & 0x7FFFFFFF)

    def push(self, token: int, eos_ids: set[int]) -> None:
        if token in eos_ids and not self.request.ignore_eos:
            self.finish = "stop"
        else:
            self.ids.append(token)
            if len(self.ids) >= self.request.max_tokens:
                self.finish = "length"
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.request.stop:
            at = text.find(stop)
            if at >= 0:
                text, self.finish = text[:at], "stop"
        if self.request.cancelled.is_set():
            self.finish = self.finish or "cancelled"
        # Hold back an incomplete UTF-8 character, and text that may turn out to start a stop string.
        ready = len(text) if self.finish else max(self.sent, len(text) - self.hold)
        if not self.finish and text[self.sent:ready].endswith("\ufffd"):
            return
        if ready > self.sent:
            self.request.emit(Event(delta=text[self.sent:ready]))
            self.sent = ready


def eos_ids(generation_config, tokenizer) -> set[int]:
    """Every token id that ends an answer: the generation config's (one or a list) and the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    return {i for i in [*eos, tokenizer.eos_token_id] if i is not None}


def _choose(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Greedy for temperature 0, else nucleus sampling with the request's own generator."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for i, row in enumerate(rows):
        r = row.request
        if r.temperature < 1e-4:  # below this, sampling is greedy in all but overflow
            tokens.append(greedy[i])
            continue
        probs = torch.softmax(logits[i].float() / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < r.top_p
            keep[0] = True  # top_p=0 keeps the most likely token instead of nothing
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return tokens


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros (masked out) before `t`'s entries along `dim` (the last or second-to-last), up to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    return F.pad(t, (missing, 0) if dim == -1 else (0, 0, missing, 0))


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=layers)


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass
class _Batch:
    """The rows being decoded: their KV cache, attention mask (1 = a real token), the position id and
    the input token of each row's next step."""

    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor  # (rows, columns)
    positions: torch.Tensor  # (rows,)
    last: torch.Tensor  # (rows,)

    def join(self, other: _Batch) -> _Batch:
        width = max(self.mask.shape[1], other.mask.shape[1])
        layers = [(torch.cat([_pad_left(k1, width, -2), _pad_left(k2, width, -2)]),
                   torch.cat([_pad_left(v1, width, -2), _pad_left(v2, width, -2)]))
                  for (k1, v1), (k2, v2) in zip(_kv(self.cache), _kv(other.cache))]
        return _Batch(self.rows + other.rows, _cache_of(layers),
                      torch.cat([_pad_left(self.mask, width, -1), _pad_left(other.mask, width, -1)]),
                      torch.cat([self.positions, other.positions]), torch.cat([self.last, other.last]))

    def keep(self, indices: list[int]) -> _Batch:
        """The rows at `indices`, without the leading columns none of them uses."""
        index = torch.tensor(indices)
        mask = self.mask[index]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        layers = [(k[index, :, start:], v[index, :, start:]) for k, v in _kv(self.cache)]
        return _Batch([self.rows[i] for i in indices], _cache_of(layers), mask[:, start:], self.positions[index],
                      self.last[index])


@dataclass
class _Prefill:
    """A request whose prompt is being read into its own cache, `done` tokens so far."""

    row: Row
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0

    @property
    def remaining(self) -> int:
        return len(self.row.request.prompt_ids) - self.done


class Engine:
    """Owns the model; `submit` from any thread, a background thread prefills and decodes."""

    def __init__(self, model, tokenizer, adapters: list[str], max_batch: int, max_queue: int, batch_wait_s: float = 0.005,
                 prefill_chunk: int = 256):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.prefill_chunk = prefill_chunk
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.eos_ids = eos_ids(getattr(model, "generation_config", None), tokenizer)
        self.device = next(self.model.parameters()).device
        self.metrics = ServeMetrics(queue_depth=self.queued)
        self.stats = {"decode_steps": 0, "prefill_chunks": 0, "requests": 0, "tokens": 0, "max_batch_seen": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loralab-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def queued(self) -> int:
        return self.queue.qsize()

    def submit(self, request: Request) -> None:
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise QueueFull from None

    def _loop(self) -> None:
        running: _Batch | None = None
        prefilling: deque[_Prefill] = deque()
        while not self._stop.is_set():
            try:
                self._admit(prefilling, len(running.rows) if running else 0)
                running = self._prefill(prefilling, running)
                if running is not None:
                    running = self._decode_step(running)
                self.metrics.running.set(len(prefilling) + (len(running.rows) if running else 0))
            except Exception as exc:  # one bad step must not kill the server: fail the requests it held
                rows = [p.row for p in prefilling] + (running.rows if running else [])
                running, prefilling = None, deque()
                for row in rows:
                    self._fail(row.request, exc)

    def _fail(self, request: Request, exc: Exception) -> None:
        self.metrics.finished.labels("error").inc()
        try:
            request.emit(Event(error=f"{type(exc).__name__}: {exc}"))
        except Exception:  # the client's event loop is gone (shutdown): nothing to tell
            pass

    def _admit(self, prefilling: deque[_Prefill], running: int) -> None:
        """Move waiting requests into `prefilling` while the batch has room. When idle, wait for one,
        then a moment (batch_wait_s) for requests sent together to start together."""
        idle = running == 0 and not prefilling
        deadline = None
        while running + len(prefilling) < self.max_batch:
            try:
                if idle and deadline is None:
                    request = self.queue.get(timeout=0.1)
                    deadline = time.perf_counter() + self.batch_wait_s
                elif idle:
                    request = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                else:
                    request = self.queue.get_nowait()
            except queue.Empty:
                return
            if not request.cancelled.is_set():
                prefilling.append(_Prefill(Row(request, self.tokenizer)))
                self.stats["requests"] += 1

    @torch.no_grad()
    def _prefill(self, prefilling: deque[_Prefill], running: _Batch | None) -> _Batch | None:
        """Up to `prefill_chunk` prompt tokens, oldest request first: the waiting prompts that fit
        whole, together in one forward pass (on a CPU each pass reads every weight once, so 32 short
        prompts one by one cost several times one pass over all of them); a longer prompt alone,
        chunk by chunk. A request whose prompt is all read gets its first token and joins the
        running batch."""
        budget = self.prefill_chunk
        while prefilling and budget > 0:
            if prefilling[0].row.request.cancelled.is_set():
                prefilling.popleft()
                continue
            group = self._whole_prompts(prefilling, budget)
            if group:
                for _ in group:
                    prefilling.popleft()
                budget -= len(group) * max(len(p.row.request.prompt_ids) for p in group)
                running = self._join(running, self._prefill_whole(group))
                continue
            p = prefilling[0]
            n = min(budget, p.remaining)
            ids = torch.tensor([p.row.request.prompt_ids[p.done:p.done + n]])
            out = self._forward([p.row], input_ids=ids, attention_mask=torch.ones((1, p.done + n), dtype=torch.long),
                                position_ids=torch.arange(p.done, p.done + n).unsqueeze(0), past_key_values=p.cache)
            p.done, budget = p.done + n, budget - n
            self.stats["prefill_chunks"] += 1
            self.metrics.prompt_tokens.inc(n)
            if not p.remaining:
                prefilling.popleft()
                token = torch.tensor(self._push([p.row], out.logits[:, -1]))
                running = self._join(running, _Batch([p.row], p.cache, torch.ones((1, p.done), dtype=torch.long),
                                                     torch.tensor([p.done]), token))
        return running

    @staticmethod
    def _whole_prompts(prefilling: deque[_Prefill], budget: int) -> list[_Prefill]:
        """The longest run of not-yet-started prompts from the front whose padded batch fits `budget`."""
        group: list[_Prefill] = []
        for p in prefilling:
            width = max([len(q.row.request.prompt_ids) for q in group] + [len(p.row.request.prompt_ids)])
            if p.done or (len(group) + 1) * width > budget:
                break
            group.append(p)
        return group

    def _prefill_whole(self, group: list[_Prefill]) -> _Batch:
        """Whole prompts in one forward pass, left-padded: every row's last token is in the last column."""
        lengths = [len(p.row.request.prompt_ids) for p in group]
        width = max(lengths)
        ids = torch.full((len(group), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, p in enumerate(group):
            ids[i, width - lengths[i]:] = torch.tensor(p.row.request.prompt_ids)
            mask[i, width - lengths[i]:] = 1
        cache = DynamicCache()
        rows = [p.row for p in group]
        out = self._forward(rows, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            past_key_values=cache)
        self.stats["prefill_chunks"] += 1
        self.metrics.prompt_tokens.inc(sum(lengths))
        tokens = torch.tensor(self._push(rows, out.logits[:, -1]))
        return _Batch(rows, cache, mask, torch.tensor(lengths), tokens)

    def _join(self, running: _Batch | None, prefilled: _Batch) -> _Batch | None:
        """The running batch with the prefilled rows that did not finish on their first token."""
        alive = [i for i, row in enumerate(prefilled.rows) if row.finish is None]
        if not alive:
            return running
        prefilled = prefilled if len(alive) == len(prefilled.rows) else prefilled.keep(alive)
        running = prefilled if running is None else running.join(prefilled)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(running.rows))
        return running

    @torch.no_grad()
    def _decode_step(self, batch: _Batch) -> _Batch | None:
        n = len(batch.rows)
        mask = torch.cat([batch.mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        out = self._forward(batch.rows, input_ids=batch.last.unsqueeze(1), attention_mask=mask,
                            position_ids=batch.positions.unsqueeze(1), past_key_values=batch.cache)
        self.stats["decode_steps"] += 1
        tokens = self._push(batch.rows, out.logits[:, -1])
        batch = _Batch(batch.rows, batch.cache, mask, batch.positions + 1, torch.tensor(tokens))
        alive = [i for i, row in enumerate(batch.rows) if row.finish is None]
        if not alive:
            return None
        return batch if len(alive) == n else batch.keep(alive)

    def _push(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Choose each row's next token and hand it to the row (which streams it, or finishes)."""
        tokens = _choose(logits.float().cpu(), rows)
        now = time.perf_counter()
        for row, token in zip(rows, tokens):
            if not row.ids and row.finish is None:
                self.metrics.ttft.observe(now - row.request.enqueued_at)
            row.push(token, self.eos_ids)
            if row.finish is not None:
                self.metrics.finished.labels(row.finish).inc()
                row.request.emit(Event(finish=row.finish, completion_tokens=len(row.ids)))
        self.stats["tokens"] += len(rows)
        self.metrics.generated(len(rows))
        return tokens

    def _forward(self, rows: list[Row], **inputs):
        """One forward pass with each row's adapter: PEFT's plain path when the rows agree on one
        (faster), its mixed-batch `adapter_names` when they do not."""
        names = [row.request.adapter or BASE for row in rows]
        extra, context = {}, nullcontext()
        if self.adapters and len(set(names)) > 1:
            extra = {"adapter_names": names}
        elif self.adapters and names[0] == BASE:
            context = self.model.disable_adapter()
        elif self.adapters and self.model.active_adapter != names[0]:
            self.model.set_adapter(names[0])
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with context:
            return self.model(**inputs, use_cache=True, logits_to_keep=1, **extra)
