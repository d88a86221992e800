"""Jobs the UI launches: loralab's own verbs, each in its own process (`python -m loralab <verb>
--config <its resolved config>`), never a shell; one at a time by default so two trainings do not
share the 2 cores, the rest queued. Cancel sends SIGTERM, which the training loop turns into a
checkpoint at the next step boundary, so a cancelled run resumes exactly (`--resume`); before the
loop has started, SIGTERM ends the process, which has nothing to save yet. Not SIGINT: a UI started
in the background of a script has SIGINT ignored, its jobs inherit that, and a cancel sent while
a job was still loading would be lost (seen in the tests under pytest-xdist).

Each job keeps its files under runs/ui/jobs/<id>/ (job.json, config.yaml, output.log), which is
also what a restarted UI lists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loralab.config import Config
from loralab.ui.form import ConfigSource, job_config
from loralab.ui.paths import Project
from loralab.util import atomic_io
from loralab.util.errors import LoralabError

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
RESUMES_WITH_FLAG = ("train", "run")  # tune and compare pick up their finished work by themselves
INTERRUPTED = 130  # the CLI's exit code when training stopped on a signal (resumable)
KILL_AFTER_S = 120  # a job that has not stopped this long after SIGTERM is killed


@dataclass
class Job:
    id: str
    verb: str
    status: JobStatus = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    error: str | None = None
    run_id: str | None = None  # the run (adapter directory) it trains, for train and run
    run_dir: str | None = None  # where that run logs its steps (log.jsonl), for its progress
    resume: bool = False
    command: list[str] | None = None  # what it ran, as a CLI user would type it in the project folder
    cancel_requested_at: float | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)


class Jobs:
    def __init__(self, project: Project, jobs_dir: str, max_running: int, source: ConfigSource):
        self.project = project
        self.source = source
        self.dir = project.resolve(jobs_dir)
        self.max_running = max_running
        self._jobs: dict[str, Job] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._load()
        self._thread = threading.Thread(target=self._loop, name="loralab-ui-jobs", daemon=True)

    def start(self) -> Jobs:
        self._thread.start()
        return self

    # --- what the routes call -----------------------------------------------------------------------

    def submit(self, verb: str, settings: dict[str, Any], quick: bool) -> Job:
        """Validate (the CLI's rules and errors), write the job's config, queue it."""
        with self._lock:
            number = max((int(i) for i in self._jobs), default=0) + 1
            while (self.dir / str(number)).exists() or (self.dir.parent / str(number)).exists():
                number += 1  # folders left by jobs this UI no longer lists are never reused
            job_id = str(number)
            root = self.dir.parent / job_id  # runs/ui/<id>/: the job's adapter, run and results
            cfg = job_config(verb, settings, quick, Path(self.project.relative(root)), self.source)
            check_paths(self.project, cfg, settings)
            trains = verb in RESUMES_WITH_FLAG
            job = Job(job_id, verb, run_id=cfg.train.output_dir if trains else None,
                      run_dir=cfg.train.run_dir if trains else None)
            atomic_io.write_text(self._config_path(job), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._jobs[job_id] = job
            self._save(job)
        return job

    def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self.get(job_id)
            if job.status == "queued":
                job.status, job.ended = "cancelled", time.time()
            elif job.status == "running" and job.cancel_requested_at is None:
                job.cancel_requested_at = time.time()
                _signal_group(self._processes[job_id], signal.SIGTERM)  # checkpoint at the next step, then exit
            self._save(job)
            return job

    def resume(self, job_id: str) -> Job:
        with self._lock:
            job = self.get(job_id)
            if job.status not in ("cancelled", "failed"):
                raise LoralabError(f"job {job_id} is {job.status}: only a cancelled or failed job resumes")
            job.status, job.resume, job.returncode, job.error = "queued", True, None, None
            job.started = job.ended = job.cancel_requested_at = None
            self._save(job)
            return job

    def get(self, job_id: str) -> Job:
        if job_id not in self._jobs:
            raise KeyError(job_id)
        return self._jobs[job_id]

    def all(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda job: int(job.id), reverse=True)

    def status_of_run(self, run_id: str) -> str | None:
        """The status of the newest job training `run_id`, if the UI launched it."""
        return next((job.status for job in self.all() if job.run_id == run_id), None)

    def log_tail(self, job_id: str, max_bytes: int = 8000) -> str:
        """The end of the job's output; a progress bar's carriage returns keep only its last state."""
        path = self._log_path(self.get(job_id))
        if not path.is_file():
            return ""
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))

    def stop(self, wait_s: float = 30) -> None:
        """On UI shutdown: ask every running job to checkpoint and stop (resumable), wait a little."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()  # no job starts after this
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.time() + wait_s
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
        self._reap()

    # --- the queue ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped.wait(0.5):
            try:
                self._reap()
                self._start_queued()
            except OSError as exc:  # a job.json that cannot be written (full disk): said, and the queue goes on
                print(f"loralab ui: jobs: {exc}", file=sys.stderr, flush=True)

    def _start_queued(self) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            queued = sorted((j for j in self._jobs.values() if j.status == "queued"), key=lambda j: int(j.id))
            for job in queued[: max(0, self.max_running - len(self._processes))]:
                try:
                    self._launch(job)
                except OSError as exc:  # its folder removed, a full disk: this job fails, the queue goes on
                    job.status, job.error, job.ended = "failed", f"could not start: {exc}", time.time()
                    try:
                        self._save(job)
                    except OSError:
                        pass

    def _launch(self, job: Job) -> None:
        """Start one queued job (the lock is held); raises OSError when it cannot."""
        config = self.project.relative(self._config_path(job))
        job.command = ["loralab", job.verb, "--config", config, *(["--resume"] if job.resume and
                                                                   job.verb in RESUMES_WITH_FLAG else [])]
        with self._log_path(job).open("ab") as log:  # the child keeps its own descriptor
            self._processes[job.id] = subprocess.Popen(
                [sys.executable, "-m", *job.command], cwd=self.project.root, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True)
        job.status, job.started = "running", time.time()
        self._save(job)

    def _reap(self) -> None:
        with self._lock:
            for job_id, process in list(self._processes.items()):
                job = self._jobs[job_id]
                code = process.poll()
                if code is None:
                    if job.cancel_requested_at and time.time() - job.cancel_requested_at > KILL_AFTER_S:
                        _signal_group(process, signal.SIGKILL)
                    continue
                del self._processes[job_id]
                job.returncode, job.ended = code, time.time()
                if code == 0:
                    job.status = "done"
                elif job.cancel_requested_at is not None or code == INTERRUPTED or self._stopped.is_set():
                    job.status = "cancelled"
                else:
                    job.status, job.error = "failed", self._last_error(job)
                self._save(job)

    def _last_error(self, job: Job) -> str:
        lines = [line for line in self.log_tail(job.id).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("loralab: error:")]
        return (errors or lines or [f"exited with code {job.returncode}"])[-1]

    # --- files --------------------------------------------------------------------------------------

    def _job_dir(self, job: Job) -> Path:
        return self.dir / job.id

    def _config_path(self, job: Job) -> Path:
        return self._job_dir(job) / "config.yaml"

    def _log_path(self, job: Job) -> Path:
        return self._job_dir(job) / "output.log"

    def _save(self, job: Job) -> None:
        atomic_io.write_json(self._job_dir(job) / "job.json", job.public())

    def _load(self) -> None:
        """Jobs of an earlier UI; one it left running was stopped with it, so it is cancelled (resumable)."""
        for path in sorted(self.dir.glob("*/job.json")) if self.dir.is_dir() else ():
            try:
                job = Job(**json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                continue
            if job.status in ("running", "queued"):
                job.status = "cancelled"
            self._jobs[job.id] = job


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """The job's whole process group (it has its own session): `compare` and `tune` train in child
    processes, which must stop with it rather than keep the cores busy as orphans."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


PATH_KEYS = ("data.dataset", "data.out_dir", "model.name_or_path")


def check_paths(project: Project, cfg: Config, settings: dict[str, Any]) -> None:
    """The paths the form set, as the resolved config holds them (after YAML parsing, so a quoted
    '/etc/passwd' is seen as /etc/passwd), stay inside the project (raises OutsideProject: 403)."""
    for key in PATH_KEYS:
        if settings.get(key) is None:
            continue
        section, name = key.split(".")
        value = str(getattr(getattr(cfg, section), name))
        if key == "data.dataset" and value.startswith("builtin:"):
            continue
        if key == "model.name_or_path" and "/" not in value and not (project.root / value).exists():
            continue  # a bundled alias (smollm2-135m-instruct) names no path
        project.resolve(value)
