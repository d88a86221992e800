"""Batched generation for `loralab serve`: one base model, any number of LoRA adapters, one
forward pass for a batch whose requests each name their own adapter.

Why by hand: `generate()` streams only at batch size 1 and runs one adapter per call. Here,
requests that arrive together are decoded together with a KV cache, each row through its own
adapter (PEFT's `adapter_names`, so the base weights are shared and never reloaded), and every
row streams its text as it is produced. Batches are formed per round: requests that arrive
while a batch runs wait (in a bounded queue) for the next round.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

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


class _Row:
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


def _choose(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
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


class Engine:
    """Owns the model; `submit` from any thread, a background thread decodes in batches."""

    def __init__(self, model, tokenizer, adapters: list[str], max_batch: int, max_queue: int, batch_wait_s: float = 0.005):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}
        self.stats = {"batches": 0, "requests": 0, "tokens": 0, "max_batch_seen": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loralab-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise QueueFull from None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.perf_counter() + self.batch_wait_s  # a moment for concurrent requests to join
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception as exc:  # one bad batch must not kill the server: fail its requests
                for r in batch:
                    try:
                        r.emit(Event(error=f"{type(exc).__name__}: {exc}"))
                    except Exception:  # the client's event loop is gone (shutdown): nothing to tell
                        pass

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @torch.no_grad()
    def run_batch(self, batch: list[Request]) -> None:
        rows = [_Row(r, self.tokenizer) for r in batch]
        n, width = len(batch), max(len(r.prompt_ids) for r in batch)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's next token is at the last position
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        names = {r.adapter or BASE for r in batch}
        extra, context = {}, nullcontext()
        if self.adapters and len(names) > 1:
            extra = {"adapter_names": [r.adapter or BASE for r in batch]}  # PEFT's mixed-adapter batch
        elif self.adapters and names == {BASE}:
            context = self.model.disable_adapter()
        elif self.adapters:
            self.model.set_adapter(names.pop())  # one adapter for the whole batch: PEFT's plain (faster) path
        cache = DynamicCache()
        device = next(self.model.parameters()).device
        self.stats["batches"] += 1
        self.stats["requests"] += n
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], n)
        with context:
            self._decode(batch, rows, ids, mask, positions, cache, device, extra)

    def _decode(self, batch, rows, ids, mask, positions, cache, device, extra) -> None:
        n = len(batch)
        for _ in range(max(r.max_tokens for r in batch) + 1):
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                             past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
            tokens = _choose(out.logits[:, -1].float().cpu(), rows)
            for row, token in zip(rows, tokens):
                if row.finish is None:
                    row.push(token, self.eos_ids)
                    self.stats["tokens"] += 1
                    if row.finish is not None:
                        row.request.emit(Event(finish=row.finish, completion_tokens=len(row.ids)))
            if all(row.finish is not None for row in rows):
                return
            ids = torch.tensor(tokens).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
