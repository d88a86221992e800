"""The Playground's model: loralab's serving engine with the base and the chosen adapters, behind
`loralab serve`'s own OpenAI-compatible app mounted at /playground. Side-by-side answers are
concurrent requests to one engine, which batches them into the same forward passes."""

from __future__ import annotations

import dataclasses
import re
import threading

from starlette.responses import JSONResponse

from loralab.config import Config, ModelConfig
from loralab.ui.paths import Project
from loralab.ui.runs import RunFiles
from loralab.util.errors import LoralabError


def adapter_name(run_id: str) -> str:
    """A model id for the OpenAI API from a run id (runs/ui/3/lora -> runs-ui-3-lora)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-") or "adapter"


def servable(run: RunFiles) -> bool:
    return run.done and (run.adapter_dir / "adapter_model.safetensors").is_file()


def serve_config(base: Config, project: Project, runs: list[RunFiles]) -> Config:
    """serve.adapters for the chosen runs, on the base model they were trained on (one base for all)."""
    cfg = dataclasses.replace(base, serve=dataclasses.replace(base.serve), model=dataclasses.replace(base.model))
    bases = {run.section("model").get("name_or_path") for run in runs}
    if len(bases) > 1:
        raise LoralabError(f"the chosen adapters were trained on different base models ({', '.join(sorted(bases))}); "
                           "choose adapters of one base")
    if bases:
        recorded = ModelConfig(**{k: v for k, v in runs[0].section("model").items()
                                  if k in {f.name for f in dataclasses.fields(ModelConfig)}})
        cfg.model = dataclasses.replace(recorded, cache_dir=base.model.cache_dir, device=base.model.device)
    cfg.serve.adapters = {adapter_name(run.id): str(run.adapter_dir) for run in runs}
    cfg.serve.merged_model = ""
    return cfg.validate()  # a recorded model section obeys today's rules, in one line if it does not


class Playground:
    """Holds at most one loaded engine; loading another set of adapters replaces it."""

    def __init__(self) -> None:
        self._app = None
        self._served = None
        self._lock = threading.Lock()

    def load(self, cfg: Config) -> list[str]:
        from loralab.deploy.serve.app import create_app
        from loralab.deploy.serve.loading import load_served

        with self._lock:
            served = load_served(cfg, say=lambda line: print(f"playground {line}", flush=True))
            # The UI's token already guards this app; a LORALAB_API_KEY in the environment would lock the page out.
            served = dataclasses.replace(served, api_key=None)
            served.engine.start()
            previous, self._served, self._app = self._served, served, create_app(served)
        if previous is not None:
            previous.engine.stop()
        return served.model_ids

    @property
    def model_ids(self) -> list[str]:
        return self._served.model_ids if self._served is not None else []

    @property
    def base_id(self) -> str | None:
        return self._served.base_id if self._served is not None else None

    def stop(self) -> None:
        if self._served is not None:
            self._served.engine.stop()

    async def __call__(self, scope, receive, send) -> None:
        """The ASGI app mounted at /playground: the loaded model's serving app, or 503 before one is loaded."""
        app = self._app
        if app is None:
            response = JSONResponse({"error": "no model loaded: choose adapters and press Load"}, status_code=503)
            await response(scope, receive, send)
            return
        await app(scope, receive, send)
