"""`loralab serve --engine llama.cpp`: llama-server decodes, loralab fronts it.

Why: on CPU, llama.cpp's llama-server (continuous batching, GGUF LoRA adapters with per-request
scales) decodes several times faster than PyTorch here (benchmarks/inference.py). loralab keeps
what it adds on top (the same OpenAI routes, API key, limits, adapter names, stop strings, JSON
logs and /metrics) and passes each request to llama-server as token ids: the prompt is tokenized
and templated by the same code as for the torch engine, and the tokens that come back go through
the same `Row` as the torch engine's (stop strings, UTF-8 hold-back, max_tokens), so the two
engines differ only in the arithmetic that produced the tokens.

The base model is written once as an F16 GGUF and each adapter as a GGUF LoRA adapter, cached
under model.cache_dir/gguf by the identity of their source files, then llama-server is started on
them with one slot per serve.max_batch. Requests that name different adapters are not batched
together by llama-server (a limit of llama.cpp); the torch engine batches them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from loralab.config import Config, ModelConfig
from loralab.deploy.serve.engine import BASE, QueueFull, Request, Row, eos_ids
from loralab.deploy.serve.metrics import ServeMetrics
from loralab.deploy.serve.protocol import Event
from loralab.util.atomic_io import file_lock
from loralab.util.errors import LoralabError

# llama-server's reasons for ending a stream, as OpenAI finish reasons
_STOP_TYPES = {"eos": "stop", "word": "stop", "limit": "length"}


def _identity(*paths: Path) -> str:
    """Which source files (by path, size and modification time) a GGUF file was written from."""
    stats = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths]
    return hashlib.sha1("|".join(stats).encode()).hexdigest()[:12]


def gguf_files(cfg: Config, model_cfg: ModelConfig, adapters: dict[str, str]) -> tuple[Path, Path, dict[str, Path]]:
    """The model's Hugging Face directory, its F16 GGUF and one GGUF adapter per served adapter,
    written unless already cached (the model's weights are loaded only to write the GGUF). Raises
    LoralabError for what GGUF cannot express (an architecture, DoRA, IA3, ...)."""
    from transformers import AutoConfig

    from loralab.deploy.export import source_pre_tokenizer
    from loralab.deploy.gguf import write_gguf
    from loralab.deploy.gguf_lora import write_gguf_lora
    from loralab.model_utils import load_base_model, resolve_model_dir

    local_dir, _ = resolve_model_dir(model_cfg)
    try:
        model_config = AutoConfig.from_pretrained(local_dir)
    except Exception as exc:  # noqa: BLE001
        raise LoralabError(f"{local_dir}: cannot read its model config ({type(exc).__name__}: {exc})") from None
    cache = Path(cfg.model.cache_dir) / "gguf"
    cache.mkdir(parents=True, exist_ok=True)
    weights = sorted(Path(local_dir).glob("*.safetensors")) or [Path(local_dir) / "config.json"]
    base = cache / f"base-{_identity(*weights)}.F16.gguf"
    loras = {name: cache / f"{name}-{_identity(Path(d) / 'adapter_model.safetensors', Path(d) / 'adapter_config.json')}.lora.gguf"
             for name, d in adapters.items()}
    with file_lock(cache / ".lock"):  # two servers starting together write each file once
        for name, path in loras.items():
            if not path.is_file():
                write_gguf_lora(adapters[name], model_config, path)
        if not base.is_file():  # write_gguf stages the file and renames it: never half a GGUF under this name
            loaded = load_base_model(model_cfg, torch.device("cpu"))
            write_gguf(loaded.model.float(), loaded.tokenizer, base, "f16", "base", source_pre_tokenizer(local_dir))
    return local_dir, base, loras


def _generation_config(local_dir: Path):
    """What the model's `generation_config` would be, without loading its weights."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(local_dir)
    except OSError:  # no generation_config.json: transformers derives it from the model config
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(local_dir))


class LlamaCppEngine:
    """The engine interface of `Engine` (submit, start, stop, alive, queued, stats, metrics) over a
    llama-server process. Requests run as tasks on the HTTP server's own event loop: no thread of
    its own, so no hand-over per token (on 2 cores, every cycle the gateway spends is taken from
    llama-server's threads)."""

    def __init__(self, base_gguf: Path, loras: dict[str, Path], tokenizer, eos_ids: set[int], max_batch: int,
                 max_queue: int, context: int):
        self.base_gguf, self.loras, self.tokenizer, self.eos_ids = base_gguf, loras, tokenizer, eos_ids
        self.max_batch, self.max_queue, self.context = max_batch, max_queue, context
        self.adapter_ids = list(loras)
        self.stats = {"requests": 0, "tokens": 0, "in_flight": 0}
        self.metrics = ServeMetrics(queue_depth=self.queued)
        self.url = ""
        self._exit = ExitStack()
        self._tasks: set[asyncio.Task] = set()  # referenced until done (the loop keeps only weak references)
        self._client = self._slots = None
        self._busy: set[int] = set()  # llama-server slots serving a request now
        self._slot_adapter: dict[int, str] = {}  # the adapter each slot's cached prompt was computed under
        self._running = False

    def start(self) -> LlamaCppEngine:
        from loralab.deploy.llama_cpp import llama_server

        # With adapters, no host-memory prompt cache shared between slots (see _take_slot).
        extra = ["--cache-ram", "0"] if self.loras else []
        self.url = self._exit.enter_context(llama_server(self.base_gguf, list(self.loras.values()), parallel=self.max_batch,
                                                         context=self.context, extra=extra))
        self._running = True
        return self

    def stop(self) -> None:
        self._running = False
        self._exit.close()

    @property
    def alive(self) -> bool:
        return self._running

    def queued(self) -> int:
        return max(0, self.stats["in_flight"] - self.max_batch)

    def submit(self, request: Request) -> None:
        """From the event loop that serves HTTP (the app's routes)."""
        if self.stats["in_flight"] >= self.max_batch + self.max_queue:
            raise QueueFull
        if self._client is None:  # created on the loop that uses them
            # aiohttp, not httpx: its C parser costs half the CPU per streamed token here, and on 2
            # cores every cycle the gateway spends is taken from llama-server.
            import aiohttp

            self._slots = asyncio.Semaphore(self.max_batch)
            # A connection per request (force_close): a kept-alive one that llama-server has closed
            # meanwhile fails the next request ("Can not write request body", 3 of 64 at 32 clients).
            connector = aiohttp.TCPConnector(limit=self.max_batch, force_close=True)
            self._client = aiohttp.ClientSession(self.url, timeout=aiohttp.ClientTimeout(total=None), connector=connector)
        self.stats["in_flight"] += 1
        self.stats["requests"] += 1
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def body(self, request: Request, slot: int, reuse_cache: bool) -> dict:
        """llama-server's /completion body for `request` on `slot`: token ids in, token ids out, streamed."""
        return {"prompt": request.prompt_ids, "n_predict": request.max_tokens, "stream": True, "return_tokens": True,
                "id_slot": slot, "cache_prompt": reuse_cache, "temperature": request.temperature, "top_p": request.top_p,
                "top_k": 0,
                "min_p": 0.0, "seed": request.seed if request.seed is not None else -1, "ignore_eos": request.ignore_eos,
                "lora": [{"id": i, "scale": 1.0 if name == request.adapter else 0.0} for i, name in enumerate(self.adapter_ids)]}

    def _take_slot(self, adapter: str) -> tuple[int, bool]:
        """A free llama-server slot for `adapter`, and whether its cached prompt may be reused.

        Why loralab picks the slot: llama-server reuses cached prompt KV even when it was computed
        under other adapter scales (ggml-org/llama.cpp#26207; reproduced here with -np 8: the base
        model's answers changed after the adapter had seen the same prompts), from the slot's own
        cache and from its host-memory cache shared by all slots (off here: --cache-ram 0). So a
        request goes to a free slot that last served the same adapter (cache reused, as llama-server
        alone would), else to another one with its cache off (the prompt is recomputed under this
        adapter, and the slot is this adapter's from then on)."""
        free = [i for i in range(self.max_batch) if i not in self._busy]
        slot = next((i for i in free if self._slot_adapter.get(i, adapter) == adapter), free[0])
        reuse = self._slot_adapter.get(slot, adapter) == adapter
        self._busy.add(slot)
        self._slot_adapter[slot] = adapter
        return slot, reuse

    async def _serve(self, request: Request) -> None:
        row = Row(request, self.tokenizer)
        try:
            async with self._slots:
                if not request.cancelled.is_set():
                    slot, reuse = self._take_slot(request.adapter or BASE)
                    try:
                        await self._stream(request, row, slot, reuse)
                    finally:
                        self._busy.discard(slot)
            if row.finish is None:
                row.finish = "cancelled"
            self.metrics.finished.labels(row.finish).inc()
            request.emit(Event(finish=row.finish, completion_tokens=len(row.ids)))
        except Exception as exc:  # llama-server gone or refusing: this request fails, the server stays up
            self.metrics.finished.labels("error").inc()
            try:
                request.emit(Event(error=f"llama-server: {type(exc).__name__}: {exc}"))
            except Exception:
                pass
        finally:
            self.stats["in_flight"] -= 1

    async def _stream(self, request: Request, row: Row, slot: int, reuse_cache: bool) -> None:
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        async with self._client.post("/completion", json=self.body(request, slot, reuse_cache)) as response:
            if response.status != 200:
                raise LoralabError(f"HTTP {response.status}: {(await response.read())[:300]!r}")
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                for token in chunk.get("tokens", []):
                    if not row.ids:
                        self.metrics.ttft.observe(time.perf_counter() - request.enqueued_at)
                    row.push(token, self.eos_ids)
                    self.stats["tokens"] += 1
                    self.metrics.generated(1)
                    if row.finish is not None:
                        return  # leaving the stream closes it: llama-server stops generating
                if chunk.get("stop"):
                    row.finish = _STOP_TYPES.get(chunk.get("stop_type"), "stop")
                    return


def load_llama_cpp(cfg: Config, device: torch.device) -> tuple[LlamaCppEngine, object]:
    """The gateway engine for cfg.serve and its tokenizer, or LoralabError saying why llama.cpp
    cannot serve it here."""
    from loralab.deploy.llama_cpp import require
    from loralab.model_utils import load_tokenizer

    s = cfg.serve
    require()
    if device.type != "cpu":
        raise LoralabError(f"the llama.cpp engine here is a CPU build; model.device resolves to {device.type}")
    if s.int8:
        raise LoralabError("serve.int8 is a PyTorch quantization; llama.cpp serves GGUF (export gguf-q8_0 instead)")
    model_cfg = dataclasses.replace(cfg.model, name_or_path=s.merged_model or cfg.model.name_or_path)
    local_dir, base, loras = gguf_files(cfg, model_cfg, {} if s.merged_model else s.adapters)
    tokenizer = load_tokenizer(local_dir)
    engine = LlamaCppEngine(base, loras, tokenizer, eos_ids(_generation_config(local_dir), tokenizer), s.max_batch,
                            s.max_queue, context=s.max_prompt_tokens + s.max_tokens_limit)
    return engine, tokenizer
