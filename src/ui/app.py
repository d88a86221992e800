"""`loralab ui`: the local web app. FastAPI, which `loralab serve` already uses, so the Playground
mounts the serving app itself rather than a second client of it; one static page with Chart.js
vendored from the npm registry (no CDN, no build step). Every route, the page and its assets
included, needs the access token printed at start (as Jupyter does)."""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from loralab.config import Config
from loralab.ui import datasets, runs, studies
from loralab.ui.form import VERBS, ConfigSource, form_fields
from loralab.ui.jobs import Jobs
from loralab.ui.paths import OutsideProject, Project
from loralab.ui.playground import Playground, adapter_name, servable, serve_config
from loralab.ui.reports import render_markdown
from loralab.util.errors import LoralabError

STATIC = files("loralab.ui") / "static"
COOKIE = "loralab_ui_token"
MAX_BODY_BYTES = 32 * 1024 * 1024  # an uploaded dataset travels as JSON text


@dataclass
class UiState:
    cfg: Config
    project: Project
    token: str
    jobs: Jobs
    playground: Playground
    source: ConfigSource


def new_token() -> str:
    return secrets.token_urlsafe(24)


class TokenCheck:
    """401 without the token (cookie, bearer header or ?token=); a page opened with ?token= gets the
    cookie. Pure ASGI rather than BaseHTTPMiddleware, which would buffer the Playground's streams.
    Any one credential that matches lets a request in: browsers send a cookie to every port of a
    host, so a stale cookie of an earlier `loralab ui` must not shadow the token in the URL."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    def _matches(self, value: str | None) -> bool:
        return bool(value) and secrets.compare_digest(value.encode(), self.token)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":  # no route uses one; refused rather than let past the check
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        from_query = request.query_params.get("token")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not any(self._matches(v) for v in (request.cookies.get(COOKIE), from_query, bearer)):
            response = JSONResponse({"error": "missing or wrong token: open the URL `loralab ui` printed"}, status_code=401)
            await response(scope, receive, send)
            return
        if not self._matches(from_query):
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token.decode()}; HttpOnly; SameSite=Strict; Path=/"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class NotFound(LookupError):
    """An id or file a request named does not exist (404)."""


def _guarded(handler):
    """A route's user errors as one-line JSON: 400 bad input, 403 outside the project, 404 unknown id."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except OutsideProject as exc:
            return _error(403, str(exc))
        except LoralabError as exc:
            return _error(400, str(exc))
        except NotFound as exc:
            return _error(404, f"not found: {exc.args[0] if exc.args else ''}")
    return wrapper


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise LoralabError(f"request body over {MAX_BODY_BYTES // 2**20} MiB")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise LoralabError("request body is not JSON") from None
    if not isinstance(data, dict):
        raise LoralabError("request body must be a JSON object")
    return data


# --- views: the same files the CLI writes, shaped for the page ---------------------------------------------

def run_summary(state: UiState, run: runs.RunFiles, entries: list[dict[str, Any]], results: dict | None) -> dict[str, Any]:
    """One row of the Runs table, from the run's log entries and its evaluation (`eval_results`)."""
    total = runs.total_steps(run, entries)
    status = runs.status(run, state.jobs.status_of_run(run.id))
    lora, train = run.section("lora"), run.section("train")
    args = run.training_args or {}
    last_eval = next((e.get("eval_loss") for e in reversed(entries) if e.get("eval_loss") is not None), None)
    updated = max((p.stat().st_mtime for p in (run.adapter_dir / "training_args.json",
                                              *([run.run_dir / "log.jsonl"] if run.run_dir else []))
                   if p.is_file()), default=None)
    # A config from before lora.method existed trained plain LoRA, the only method then.
    return {"id": run.id, "name": run.id, "path": run.id, "status": status, "method": lora.get("method", "lora"),
            "r": lora.get("r"), "learning_rate": train.get("learning_rate"),
            "steps": entries[-1]["step"] if entries else (total if run.done else 0), "total_steps": total,
            "final_eval_loss": args.get("final_eval_loss", last_eval), "updated": updated,
            "progress": runs.progress(entries, total) if status in ("running", "queued") else None,
            "servable": servable(run), "has_samples": bool(results and results.get("samples"))}


def summary_of(state: UiState, run: runs.RunFiles) -> dict[str, Any]:
    return run_summary(state, run, runs.curve(state.project, run), eval_results(state, run))


def run_detail(state: UiState, run: runs.RunFiles) -> dict[str, Any]:
    entries, results = runs.curve(state.project, run), eval_results(state, run)
    detail = run_summary(state, run, entries, results)
    detail["curve"] = [{k: e.get(k) for k in ("step", "loss", "eval_loss", "tokens_per_s", "elapsed_s")} for e in entries]
    detail["config"] = run.config
    detail["eval"], detail["samples"], detail["report_html"] = _evaluation(state, run, results)
    return detail


def eval_results(state: UiState, run: runs.RunFiles) -> dict | None:
    """The run's eval_results.json, when it evaluated this adapter."""
    results_path = runs.result_file(state.project, run, "eval", "results_json", "eval_results.json")
    results = runs.read_json(results_path) if results_path else None
    if not isinstance(results, dict) or not _same_path(state.project, results.get("adapter_dir"), run.adapter_dir):
        return None
    return results


def _evaluation(state: UiState, run: runs.RunFiles, results: dict | None) -> tuple[dict | None, list, str | None]:
    """Headline metrics, before/after answers and the rendered report.md of the run's evaluation."""
    if results is None:
        return None, [], None
    models = results.get("models", {})
    headline: dict[str, Any] = {"split": results.get("split"), "examples": results.get("examples")}
    for name, label in (("base", "base"), ("fine_tuned", "fine-tuned")):
        scores = models.get(name, {})
        headline[f"{label} perplexity"] = scores.get("perplexity")
        headline[f"{label} domain score (above chance)"] = scores.get("domain_accuracy")
    for key, value in results.get("summary", {}).items():
        headline[key.replace("_", " ")] = value
    baselines = results.get("baselines")
    if baselines:  # the held-out evidence: the gain over constant answers and the base, with its interval
        headline["best competitor per task (macro %)"] = baselines["best_baseline"]
        headline["gain over the best competitor, points"] = baselines["gain"]
        headline["gain 95 % CI"] = "{:+.1f} to {:+.1f}".format(*baselines["gain_ci95"])
    report_path = runs.result_file(state.project, run, "eval", "report_md", "report.md")
    report = render_markdown(state.project, report_path) if report_path else None
    return headline, results.get("samples", []), report


def _same_path(project: Project, recorded: str | None, path: Path) -> bool:
    return recorded is not None and runs.inside(project, recorded) == path


# --- the app ------------------------------------------------------------------------------------------------

def create_app(state: UiState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.jobs.start()
        yield
        state.jobs.stop()
        state.playground.stop()

    app = FastAPI(title="loralab ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(TokenCheck, token=state.token)
    app.mount("/playground", state.playground)
    project = state.project

    @app.get("/")
    async def index():
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html")

    @app.get("/static/{name:path}")
    @_guarded
    async def static(name: str):
        path = Path(str(STATIC)).resolve() / name
        if Path(str(STATIC)).resolve() not in path.resolve().parents or not path.is_file():
            raise NotFound(name)
        return FileResponse(path)

    @app.get("/files/{name:path}")
    @_guarded
    async def project_file(name: str):
        path = project.resolve(name)
        if not path.is_file():
            raise NotFound(name)
        # A project file is data, never a page of this origin: an HTML or SVG file in a downloaded model
        # folder must not run script with the UI's cookie.
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"})

    # The views walk the project folder: in a worker thread, so a walk never stalls the Playground's streams.
    @app.get("/api/runs")
    async def list_runs():
        return await asyncio.to_thread(runs_listing, state)

    @app.get("/api/runs/detail")
    @_guarded
    async def one_run(id: str):
        project.resolve(id)
        return await asyncio.to_thread(lambda: run_detail(state, _lookup(runs.find_runs(project), id)))

    @app.get("/api/studies/detail")
    @_guarded
    async def one_study(id: str):
        return await asyncio.to_thread(study_detail, state, id)

    @app.get("/api/form")
    async def form():
        return {"verbs": list(VERBS), "presets": ["quick"], "fields": form_fields(state.source)}

    @app.post("/api/jobs")
    @_guarded
    async def submit(request: Request):
        body = await _json_body(request)
        job = state.jobs.submit(str(body.get("verb")), body.get("settings") or {}, bool(body.get("quick")))
        return _job_view(state, job.id)

    @app.get("/api/jobs")
    async def list_jobs():
        return [_job_view(state, job.id, log=False) for job in state.jobs.all()]

    @app.get("/api/jobs/{job_id}")
    @_guarded
    async def one_job(job_id: str):
        return _job_view(state, _lookup_job(state, job_id))

    @app.post("/api/jobs/{job_id}/cancel")
    @_guarded
    async def cancel(job_id: str):
        state.jobs.cancel(_lookup_job(state, job_id))
        return _job_view(state, job_id)

    @app.post("/api/jobs/{job_id}/resume")
    @_guarded
    async def resume(job_id: str):
        state.jobs.resume(_lookup_job(state, job_id))
        return _job_view(state, job_id)

    @app.get("/api/data/dirs")
    async def data_dirs():
        return {"dirs": await asyncio.to_thread(datasets.prepared_dirs, project)}

    @app.get("/api/data")
    @_guarded
    async def data(dir: str):
        return await asyncio.to_thread(datasets.view, project, project.resolve(dir))

    @app.post("/api/datasets")
    @_guarded
    async def upload(request: Request):
        body = await _json_body(request)
        return await asyncio.to_thread(datasets.upload, project, state.cfg.data, body)

    @app.get("/api/playground/models")
    async def playground_models():
        found = await asyncio.to_thread(runs.find_runs, project)
        available = [{"id": run.id, "name": adapter_name(run.id), "path": run.id} for run in found.values() if servable(run)]
        return {"available": available, "loaded": state.playground.model_ids, "base": state.playground.base_id}

    @app.post("/api/playground/load")
    @_guarded
    async def playground_load(request: Request):
        body = await _json_body(request)
        found = await asyncio.to_thread(runs.find_runs, project)
        chosen = []
        for run_id in body.get("adapters") or []:
            project.resolve(str(run_id))
            if run_id not in found or not servable(found[run_id]):
                raise LoralabError(f"adapters: {run_id} is not a finished LoRA adapter of this project")
            chosen.append(found[run_id])
        loaded = await asyncio.to_thread(state.playground.load, serve_config(state.cfg, project, chosen))
        return {"loaded": loaded, "base": state.playground.base_id}

    return app


def _job_view(state: UiState, job_id: str, log: bool = True) -> dict[str, Any]:
    job = state.jobs.get(job_id)
    view = job.public()
    view["progress"] = None
    if job.run_dir and job.status == "running":
        log_path = state.project.resolve(job.run_dir) / "log.jsonl"
        entries = runs.read_log(log_path) if log_path.is_file() else []
        view["progress"] = runs.progress(entries, entries[-1].get("total_steps") if entries else None)
    if log:
        view["log_tail"] = state.jobs.log_tail(job_id)
    return view


def _lookup(found: dict, key: str):
    if key not in found:
        raise NotFound(key)
    return found[key]


def _lookup_job(state: UiState, job_id: str) -> str:
    try:
        state.jobs.get(job_id)
    except KeyError:
        raise NotFound(f"job {job_id}") from None
    return job_id


def runs_listing(state: UiState) -> dict[str, Any]:
    found = runs.find_runs(state.project)
    items = sorted((summary_of(state, run) for run in found.values()), key=lambda r: -(r["updated"] or 0))
    study_items = [{"id": sid, "kind": kind, "title": f"{kind}: {sid}", "path": sid, "updated": path.stat().st_mtime}
                   for sid, (kind, path) in sorted(studies.find_studies(state.project).items())]
    return {"runs": items, "studies": study_items}


def study_detail(state: UiState, study_id: str) -> dict[str, Any]:
    project = state.project
    kind, found = _lookup(studies.find_studies(project), project.relative(project.resolve(study_id)))
    try:
        view = studies.study_view(kind, found)
    except ValueError:  # being rewritten this very moment
        raise LoralabError(f"{study_id}: not readable JSON right now; try again") from None
    return {"id": study_id, "kind": kind, "title": f"{kind}: {study_id}", "path": study_id, **view,
            "report_html": render_markdown(project, studies.report_path(kind, found))}


def build_state(cfg: Config, root: str | Path = ".", token: str | None = None,
                source: ConfigSource | None = None) -> UiState:
    """`source`: the --config files and --set overrides the UI was started with, the base of its jobs."""
    project = Project(root)
    source = source or ConfigSource()
    jobs = Jobs(project, cfg.ui.jobs_dir, cfg.ui.max_running_jobs, source)
    return UiState(cfg, project, token or new_token(), jobs, Playground(), source)


def run_ui(cfg: Config, source: ConfigSource) -> None:
    """Serve the UI from the current folder until Ctrl-C; running jobs then checkpoint and stop."""
    import uvicorn

    from loralab.util.net import free_port

    state = build_state(cfg, source=source)
    port = cfg.ui.port or free_port()
    print(f"loralab ui on http://{cfg.ui.host}:{port}/?token={state.token}  (project {state.project.root}; Ctrl-C stops it)",
          flush=True)
    uvicorn.run(create_app(state), host=cfg.ui.host, port=port, log_level="warning")

