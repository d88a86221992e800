"""Experiment tracking: one training run's params, step metrics, evaluation and artifacts, sent to the
trackers named in `train.report_to` through their own libraries (docs/tracking.md).

Why their own libraries: a user compares loralab runs in the TensorBoard or MLflow UI they already use,
next to runs of other tools, so loralab writes what those UIs read (TensorBoard event files through
torch's `SummaryWriter`; MLflow runs through `MlflowClient`) instead of a format of its own.

- `open_run` starts (or, on `--resume`, continues) a run; the recipe logs each step's metrics as it
  writes them to log.jsonl, then the adapter and the loss plot; a `Tracker` with no backend (report_to
  empty, and on every data-parallel rank but the main one) does nothing.
- `<run_dir>/tracking.json` records where the run went (its MLflow run id, its TensorBoard directory),
  so `--resume` and `loralab run`'s evaluation log into the same run (`log_evaluation`); `loralab
  evaluate` does too for that run's adapter, and opens a run of its own for any other adapter.
- `study_run` is the parent of a study's runs (tune trials, compare runs, sweep points, domain adapters): MLflow nests
  them under it (the `mlflow.parentRunId` tag), TensorBoard gets one subdirectory per run.
tensorboard and mlflow are imported only here and only when named, so loralab works without them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

from loralab.config import Config, TrainConfig
from loralab.util import atomic_io
from loralab.util.errors import LoralabError

# What each logged step sends: the numbers of log.jsonl a curve is drawn from (step is the x axis).
STEP_METRICS = ("loss", "eval_loss", "lr", "tokens_per_s", "peak_rss_mb", "epoch")
RECORD_FILE = "tracking.json"
# MLflow's default since its file store was frozen (it refuses `file:` stores unless told otherwise).
DEFAULT_MLFLOW_URI = "sqlite:///runs/mlflow.db"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: its UI shows a run nested under the run it names
ADAPTER_TAG = "loralab.adapter"  # on a run of `loralab evaluate` alone: the adapter it evaluated
STUDY_TAG = "loralab.study"  # "<kind>/<name>" on a study's parent run, so a rerun (or another worker) finds it
# MLflow's limits: characters of a param value, and params or metrics per log_batch request.
_MAX_PARAM_CHARS, _BATCH = 6000, 100
_INSTALL = {"tensorboard": "tensorboard==2.21.0", "mlflow": "mlflow==3.17.2"}


@dataclass(frozen=True)
class TrackingContext:
    """Where one training run sits in a study: given by the study to `train()` (plain strings, so it
    crosses into the spawned process a study trains in)."""

    name: str  # the MLflow run name, and the TensorBoard subdirectory under `group`
    group: str = ""  # "<kind>/<study name>": the study's TensorBoard directory
    parent_run_id: str | None = None  # the study's MLflow run; None when MLflow is not tracked


def require_trackers(report_to: list[str]) -> None:
    """Fail in one line, before any model is loaded, when a named tracker's package is missing."""
    for name in report_to:
        if find_spec(name) is None:
            raise LoralabError(f"train.report_to names {name}, which is not installed: pip install {_INSTALL[name]} "
                               f"(or pip install 'loralab[track]')")


def mlflow_uri(t: TrainConfig) -> str:
    """train.mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite store under runs/. A local
    SQLite path is made absolute so that a run reopened from another directory finds its store."""
    uri = t.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def tensorboard_dir(t: TrainConfig, run_dir: Path, context: TrackingContext | None) -> Path:
    """This run's TensorBoard directory: inside its run directory by default (so `tensorboard --logdir runs`
    shows every run, each study run in its own), or `train.tracking_dir/<group>/<name>`."""
    if not t.tracking_dir:
        return run_dir / "tensorboard"
    name = context.name if context else run_dir.name
    return Path(t.tracking_dir) / (context.group if context else "") / name


def flat_params(cfg: Config) -> dict[str, str | int | float | bool]:
    """The resolved config as `section.key` params (the names `--set` takes); lists, mappings and None as
    JSON, since trackers store scalars."""
    params: dict[str, str | int | float | bool] = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            params[f"{section}.{key}"] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return params


class _Backend(Protocol):
    record: dict  # what tracking.json keeps to reopen this backend's run

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, folder: str) -> None: ...
    def close(self, status: str) -> None: ...


class _TensorBoard:
    """Event files through torch's SummaryWriter (the tensorboard package writes them underneath)."""

    def __init__(self, logdir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of steps a resumed run redoes (after its last checkpoint) are dropped, not doubled
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)
        self.record = {"logdir": str(logdir)}

    def log_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The HParams dashboard reads these three summaries from the run's own directory and the metrics
        # named here from its scalars (SummaryWriter.add_hparams would write them to a new subdirectory).
        for summary in hparams(params, {"eval_loss": None, "loss": None}):
            self.writer.file_writer.add_summary(summary)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run keeps what it logged, as log.jsonl does

    def log_artifact(self, path: Path, folder: str) -> None:
        """TensorBoard stores no files: a PNG becomes an image, Markdown a text panel; the rest is MLflow's."""
        tag = f"{folder}/{path.stem}" if folder else path.stem
        if path.suffix == ".png":
            from matplotlib.image import imread

            self.writer.add_image(tag, imread(path)[..., :3], dataformats="HWC")
        elif path.suffix == ".md":
            self.writer.add_text(tag, path.read_text(encoding="utf-8"))
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    """One MLflow run through MlflowClient, which takes the run id on every call: no active-run state
    in the process (mlflow.start_run keeps one), so a study and its runs never mix up their runs."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri=uri), run_id
        self.record = {"tracking_uri": uri, "run_id": run_id}

    @classmethod
    def start(cls, uri: str, experiment: str, name: str | None, tags: dict[str, str]) -> _MLflow:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(_experiment_id(client, uri, experiment), run_name=name, tags=tags)
        return cls(uri, run.info.run_id)

    def reopen(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:_MAX_PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + _BATCH])

    def log_artifact(self, path: Path, folder: str) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _experiment_id(client, uri: str, name: str) -> str:
    """The experiment's id, created on first use. With a local SQLite store its artifacts go beside the
    database (MLflow would otherwise put them in ./mlruns of whatever directory the run started in); a
    server decides for itself."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


class Tracker:
    """Fans each call out to the run's backends; with none it does nothing, so the recipe calls it
    unconditionally."""

    def __init__(self, backends: dict[str, _Backend] | None = None, record_path: Path | None = None, step: int = 0):
        self.backends = backends or {}
        self.record_path = record_path
        self.step = step  # the last step logged: where evaluation results go on the x axis
        self._stopped_by_caller = False

    @property
    def mlflow_run_id(self) -> str | None:
        backend = self.backends.get("mlflow")
        return backend.run_id if backend is not None else None

    def log_params(self, params: dict[str, Any]) -> None:
        for backend in self.backends.values():
            backend.log_params(params)

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        values = {k: v for k, v in metrics.items() if v is not None}
        for backend in self.backends.values():
            backend.log_metrics(values, step)
        self.step = max(self.step, step)

    def log_step(self, entry: dict) -> None:
        """One entry of log.jsonl (training/log.py), the same numbers at the same step."""
        self.log_metrics({key: entry.get(key) for key in STEP_METRICS}, entry["step"])

    def log_artifact(self, path: str | Path, folder: str = "") -> None:
        """A file or a directory, when it exists; "" is none (train.loss_plot when the plot is off)."""
        if path and Path(path).exists():
            for backend in self.backends.values():
                backend.log_artifact(Path(path), folder)

    def watch(self, on_eval: Callable | None) -> Callable | None:
        """`on_eval` as given, noting when it raises: the caller stopped the run (tune prunes a trial)."""
        if on_eval is None or not self.backends:
            return on_eval

        def watched(*args: Any) -> None:
            try:
                on_eval(*args)
            except BaseException:
                self._stopped_by_caller = True
                raise

        return watched

    @contextmanager
    def closed_on_error(self) -> Iterator[None]:
        """A run that raises ends KILLED (Ctrl-C, or stopped by its caller) or FAILED, not RUNNING forever."""
        try:
            yield
        except BaseException as exc:
            self.close("KILLED" if isinstance(exc, KeyboardInterrupt) or self._stopped_by_caller else "FAILED")
            raise

    def close(self, status: str = "FINISHED") -> None:
        """Ends the run with an MLflow status (FINISHED, KILLED, FAILED) and records how far it got."""
        for backend in self.backends.values():
            backend.close(status)
        if self.record_path is not None and self.backends:
            _write_record(self.record_path, self.backends, self.step)
        self.backends = {}


def _write_record(path: Path, backends: dict[str, _Backend], step: int) -> None:
    atomic_io.write_json(path, {"step": step, **{name: backend.record for name, backend in backends.items()}})


def _read_record(run_dir: Path) -> dict | None:
    path = run_dir / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def open_run(cfg: Config, run_dir: Path, start_step: int, context: TrackingContext | None = None) -> Tracker:
    """The tracked run of a training that starts at `start_step`: a new one that logs the config, or with
    `--resume` (start_step > 0) the run recorded in run_dir, continued."""
    t = cfg.train
    if not t.report_to:
        return Tracker()
    require_trackers(t.report_to)
    previous = (_read_record(run_dir) if start_step else None) or {}
    backends: dict[str, _Backend] = {}
    continued: set[str] = set()  # backends whose run started before this process: their params are logged
    if "tensorboard" in t.report_to:
        logdir = tensorboard_dir(t, run_dir, context)
        if not start_step:
            shutil.rmtree(logdir, ignore_errors=True)  # a fresh run replaces this run's curves, as log.jsonl does
        elif previous.get("tensorboard", {}).get("logdir") == str(logdir):
            continued.add("tensorboard")
        backends["tensorboard"] = _TensorBoard(logdir, purge_step=start_step + 1 if start_step else None)
    if "mlflow" in t.report_to:
        uri = mlflow_uri(t)
        old = previous.get("mlflow", {})
        if old.get("tracking_uri") == uri:
            backends["mlflow"] = _MLflow(uri, old["run_id"])
            backends["mlflow"].reopen()
            continued.add("mlflow")
        else:
            tags = {"loralab.run_dir": str(run_dir.resolve())}
            if context is not None and context.parent_run_id:
                tags[PARENT_TAG] = context.parent_run_id
            backends["mlflow"] = _MLflow.start(uri, t.experiment_name, context.name if context else None, tags)
    params = flat_params(cfg)
    for name, backend in backends.items():
        if name not in continued:
            backend.log_params(params)
    _write_record(run_dir / RECORD_FILE, backends, start_step)
    return Tracker(backends, run_dir / RECORD_FILE, start_step)


def log_evaluation(t: TrainConfig, results: dict, files: list[str | Path]) -> None:
    """`loralab run`'s evaluation into its training run: the numbers of eval_results.json (`<split>/<model>/
    <metric>` and `<split>/<summary metric>`) at the run's last step, and the result files themselves."""
    record = _read_record(Path(t.run_dir))
    if not t.report_to or record is None:
        return
    backends: dict[str, _Backend] = {}
    if "tensorboard" in t.report_to and "tensorboard" in record:
        backends["tensorboard"] = _TensorBoard(Path(record["tensorboard"]["logdir"]), purge_step=None)
    if "mlflow" in t.report_to and "mlflow" in record:
        backends["mlflow"] = _MLflow(record["mlflow"]["tracking_uri"], record["mlflow"]["run_id"])
    _send_evaluation(Tracker(backends, Path(t.run_dir) / RECORD_FILE, record["step"]), results, files)


def log_standalone_evaluation(cfg: Config, results: dict, files: list[str | Path],
                              adapter_dir: str | Path | None = None) -> None:
    """`loralab evaluate`'s numbers into train.report_to's trackers: into the tracked training run of
    train.run_dir when the adapter is that run's own (train.output_dir, the default), as `loralab run`
    does; an adapter from anywhere else gets a run of its own, `evaluate <adapter>`, so its numbers are
    never filed under a training they did not come from."""
    t = cfg.train
    if not t.report_to:
        return
    require_trackers(t.report_to)
    adapter = Path(adapter_dir or t.output_dir).resolve()
    if _read_record(Path(t.run_dir)) is not None and adapter == Path(t.output_dir).resolve():
        log_evaluation(t, results, files)
        return
    _send_evaluation(_evaluation_run(cfg, adapter), results, files)


def _send_evaluation(tracker: Tracker, results: dict, files: list[str | Path]) -> None:
    """An evaluation's numbers at the tracker's last step (0 for a run of its own), its files under
    `evaluation/`, then the run closed."""
    tracker.log_metrics(evaluation_metrics(results), tracker.step)
    for path in files:
        tracker.log_artifact(path, "evaluation")
    tracker.close()


def _evaluation_run(cfg: Config, adapter: Path) -> Tracker:
    """A new tracked run for one evaluation: the config as params, the adapter's path as a tag; TensorBoard
    under `<train.tracking_dir or train.run_dir>/evaluations/<adapter folder>`, replaced by a rerun."""
    t = cfg.train
    backends: dict[str, _Backend] = {}
    if "tensorboard" in t.report_to:
        logdir = Path(t.tracking_dir or t.run_dir) / "evaluations" / adapter.name
        shutil.rmtree(logdir, ignore_errors=True)
        backends["tensorboard"] = _TensorBoard(logdir, purge_step=None)
    if "mlflow" in t.report_to:
        backends["mlflow"] = _MLflow.start(mlflow_uri(t), t.experiment_name, f"evaluate {adapter.name}",
                                           {ADAPTER_TAG: str(adapter)})
    tracker = Tracker(backends)
    tracker.log_params(flat_params(cfg))
    return tracker


def evaluation_metrics(results: dict) -> dict[str, float]:
    """The scalar numbers of an evaluation result (metrics/evaluate.py); nested detail stays in the file."""
    split = results.get("split", "eval")
    metrics = {f"{split}/{model}/{key}": value for model, values in results.get("models", {}).items()
               for key, value in values.items() if _is_number(value)}
    metrics.update({f"{split}/{key}": value for key, value in results.get("summary", {}).items() if _is_number(value)})
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class StudyRun:
    """The parent run of a study's trainings: hands each one its `TrackingContext`."""

    def __init__(self, kind: str, name: str, mlflow: _MLflow | None):
        self.group, self.mlflow = f"{kind}/{name}", mlflow

    def child(self, name: str) -> TrackingContext:
        return TrackingContext(name=name, group=self.group, parent_run_id=self.mlflow.run_id if self.mlflow else None)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Numbers of the whole study (domains' cross-evaluation matrix) on its parent run."""
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, 0)

    def log_artifact(self, path: str | Path) -> None:
        """A result file of the whole study (its summary, its table), when it exists."""
        if self.mlflow is not None and Path(path).is_file():
            self.mlflow.log_artifact(Path(path), "")


@contextmanager
def study_run(cfg: Config, kind: str, name: str) -> Iterator[StudyRun]:
    """The MLflow parent run of study `kind` named `name` (tune's study name, compare's runs directory),
    reused when it exists (a rerun, another tune worker), with the study's own settings as params; it
    ends FINISHED, or KILLED/FAILED when the study raises. Without MLflow in report_to, no parent run."""
    t = cfg.train
    if "mlflow" not in t.report_to:
        yield StudyRun(kind, name, None)
        return
    require_trackers(["mlflow"])
    parent = _study_parent(cfg, kind, name)
    try:
        yield StudyRun(kind, name, parent)
    except BaseException as exc:
        parent.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    parent.close("FINISHED")


def _study_parent(cfg: Config, kind: str, name: str) -> _MLflow:
    from mlflow import MlflowClient

    uri, t = mlflow_uri(cfg.train), cfg.train
    client = MlflowClient(tracking_uri=uri)
    study = f"{kind}/{name}".replace("'", "_")  # quoted in the filter below
    found = client.search_runs([_experiment_id(client, uri, t.experiment_name)],
                               filter_string=f"tags.`{STUDY_TAG}` = '{study}'", max_results=1)
    if found:
        parent = _MLflow(uri, found[0].info.run_id)
        parent.reopen()
        return parent
    parent = _MLflow.start(uri, t.experiment_name, f"{kind} {name}", {STUDY_TAG: study})
    section = cfg.to_dict().get(kind, {})
    parent.log_params({f"{kind}.{key}": v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
                       for key, v in section.items()})
    return parent
