"""Experiment tracking: metrics.jsonl always, plus one tracker chosen by `train.tracking`.

A `Tracker` is four methods (`log_params`, `log_metrics`, `log_artifact`, `close`). `make_tracker`
picks one from the config:

- `tensorboard`: TensorBoard events in `<run_dir>/tb` (tensorboardX).
- `mlflow`: an MLflow run, through `MlflowClient` (no global MLflow state). `train.tracking_uri`
  None means the local store `sqlite:///<run_dir>/../mlflow.db`, artifacts beside it in
  `mlartifacts/`. That is MLflow's own default file name (since 3.7 its default store is SQLite and
  the `./mlruns` file store is retired), so `mlflow ui` run in the runs folder shows the runs;
  `default_ui_command` prints the command with the full path. A team points `train.tracking_uri` at
  its tracking server (`http://host:5000`) or database. A resumed run (same run dir) continues the
  same MLflow run, whose id is kept in `<run_dir>/mlflow_run_id`.
- `none`: nothing beside metrics.jsonl.

Only process 0 tracks (`enabled=False` gives a `NullTracker`). A tracking store that cannot be
opened is a `TrackingError` before training starts; a store that fails mid-run is warned about once
and then ignored, since metrics.jsonl has every record anyway.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from atlas_jax.config import TRACKERS
from atlas_jax.errors import AtlasError, ConfigError

EXPERIMENT = "atlas"
RUN_ID_FILE = "mlflow_run_id"
STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingError(AtlasError):
    pass


# ---------------------------------------------------------------------------------------------- values


def flatten_params(cfg, prefix: str = "") -> dict:
    """A config (dataclass or nested dict) as {"section.key": value}."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    out = {}
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_params(v, name + "."))
        else:
            out[name] = v
    return out


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The real-number fields of a record (bools, strings, lists and None left out), as floats."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _param_value(v, limit: int) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, (list, tuple, dict)) else str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


def _key(k: str, limit: int = 250) -> str:
    """A metric or param name MLflow accepts: alphanumerics, _ - . space /."""
    return _BAD_KEY_CHARS.sub("_", str(k))[:limit] or "_"


def _one_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- trackers


class Tracker:
    """The interface, and the tracker that records nothing (`NullTracker`)."""

    def log_params(self, params: dict) -> None:
        """Flattened config ({"section.key": value}); call once, at the start of a run."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        """The numeric values of `metrics` at `step` (others are skipped)."""

    def log_artifact(self, path) -> None:
        """Copy a file (loss.png, config.yaml) into the run."""

    def close(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED."""


class NullTracker(Tracker):
    pass


class TensorBoardTracker(Tracker):
    """TensorBoard events in `<run_dir>/tb`: scalars per step, the params as one text summary."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log_params(self, params: dict) -> None:
        rows = "\n".join(f"| {k} | {_param_value(v, 500)} |" for k, v in params.items())
        self.writer.add_text("config", "| param | value |\n|---|---|\n" + rows)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for k, v in numeric_metrics(metrics).items():
            self.writer.add_scalar(k, v, step)

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_tracking_uri(run_dir: Path) -> str:
    """The local store for a run dir: `sqlite:///<run_dir>/../mlflow.db` (absolute path)."""
    return "sqlite:///" + (Path(run_dir).resolve().parent / "mlflow.db").as_posix()


def default_ui_command(run_dir: Path) -> str:
    """The command that shows the local store's runs in the MLflow UI (needs the full `mlflow`)."""
    return f"mlflow ui --backend-store-uri {default_tracking_uri(run_dir)}"


def _local_artifact_root(uri: str) -> str | None:
    """A local sqlite store keeps artifacts beside the database, in `mlartifacts/`; others decide."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts").resolve().as_uri() if db.name not in ("", ":memory:") else None


def _bad_uri(uri: str, why: str) -> TrackingError:
    return TrackingError(
        f"train.tracking_uri={uri!r}: cannot open the MLflow tracking store ({why}); set it to a "
        "reachable tracking server (http://HOST:5000) or a local database (sqlite:////abs/path/mlflow.db), "
        "or leave it unset for the local store next to the run dir")


class MLflowTracker(Tracker):
    """One MLflow run per run dir, through `MlflowClient(tracking_uri)`; resumes continue it."""

    def __init__(self, run_dir: Path, tracking_uri: str | None = None, experiment: str = EXPERIMENT):
        try:
            from mlflow.tracking import MlflowClient
            from mlflow.utils import validation
        except ImportError as e:
            raise TrackingError(f"train.tracking=mlflow needs the MLflow client ({_one_line(e)}): "
                                "pip install -e '.[tracking]', or set train.tracking=tensorboard") from None
        self.run_dir = Path(run_dir)
        self.uri = tracking_uri or default_tracking_uri(self.run_dir)
        self._max_param = getattr(validation, "MAX_PARAM_VAL_LENGTH", 500)
        self._max_key = getattr(validation, "MAX_ENTITY_KEY_LENGTH", 250)
        self._params_per_batch = getattr(validation, "MAX_PARAMS_TAGS_PER_BATCH", 100)
        self._metrics_per_batch = getattr(validation, "MAX_METRICS_PER_BATCH", 1000)
        self._warned = False
        self._closed = False
        _check_reachable(self.uri)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                exp_id = self.client.create_experiment(experiment, artifact_location=_local_artifact_root(self.uri))
            elif exp.lifecycle_stage != "active":
                raise TrackingError(f"MLflow experiment {experiment!r} in {self.uri} is deleted: restore it "
                                    f"(mlflow experiments restore --experiment-id {exp.experiment_id}) "
                                    "or delete it for good (mlflow gc)")
            else:
                exp_id = exp.experiment_id
            self.run_id, self.resumed = self._open_run(exp_id)
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure to open the store is the URI's problem
            if "MLFLOW_ALLOW_FILE_STORE" in str(e):
                why = ("MLflow no longer opens ./mlruns file stores: use a sqlite:/// database instead, "
                       "`mlflow migrate-filestore` converts an old one")
            else:
                why = f"{type(e).__name__}: {_one_line(e)}"
            raise _bad_uri(self.uri, why) from None

    def _open_run(self, exp_id: str) -> tuple[str, bool]:
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.is_file():
            old = id_file.read_text().strip()
            run = self._get_run(old)
            if run is not None and run.info.experiment_id == exp_id and run.info.lifecycle_stage == "active":
                self.client.update_run(old, status="RUNNING")
                return old, True
        run = self.client.create_run(exp_id, run_name=self.run_dir.name,
                                     tags={"atlas.run_dir": str(self.run_dir.resolve())})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.info.run_id + "\n")
        return run.info.run_id, False

    def _get_run(self, run_id: str):
        from mlflow.exceptions import MlflowException
        try:
            return self.client.get_run(run_id)
        except MlflowException:  # not in this store (another tracking_uri, or deleted for good)
            return None

    def _warn(self, what: str, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            print(f"warning: MLflow {what} failed ({type(e).__name__}: {_one_line(e)}); "
                  "metrics.jsonl keeps every record; further MLflow errors are not shown", file=sys.stderr)

    def log_params(self, params: dict) -> None:
        """New keys become params; on a resume, a key whose value changed becomes the tag `resumed.<key>`
        (MLflow params are immutable)."""
        from mlflow.entities import Param, RunTag
        try:
            old = self.client.get_run(self.run_id).data.params if self.resumed else {}
            new, changed = [], []
            for k, v in params.items():
                key, val = _key(k, self._max_key), _param_value(v, self._max_param)
                if key not in old:
                    new.append(Param(key, val))
                elif old[key] != val:
                    changed.append(RunTag(_key(f"resumed.{key}", self._max_key), val))
            n = self._params_per_batch
            for i in range(0, len(new), n):
                self.client.log_batch(self.run_id, params=new[i:i + n])
            for i in range(0, len(changed), n):
                self.client.log_batch(self.run_id, tags=changed[i:i + n])
        except Exception as e:  # noqa: BLE001
            self._warn("log_params", e)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        ms = [Metric(_key(k, self._max_key), v, ts, int(step)) for k, v in numeric_metrics(metrics).items()]
        try:
            n = self._metrics_per_batch
            for i in range(0, len(ms), n):
                self.client.log_batch(self.run_id, metrics=ms[i:i + n])
        except Exception as e:  # noqa: BLE001
            self._warn("log_metrics", e)

    def log_artifact(self, path) -> None:
        if path is None or not Path(path).is_file():
            return
        try:
            self.client.log_artifact(self.run_id, str(path))
        except Exception as e:  # noqa: BLE001
            self._warn("log_artifact", e)

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.client.set_terminated(self.run_id, status if status in STATUSES else "FAILED")
        except Exception as e:  # noqa: BLE001
            self._warn("set_terminated", e)


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An http(s) server that does not answer fails in seconds, not after MLflow's minutes of retries."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import requests
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        raise _bad_uri(uri, f"no answer: {type(e).__name__}") from None


def make_tracker(tracking: str, tracking_uri: str | None, run_dir: Path, enabled: bool,
                 experiment: str = EXPERIMENT) -> Tracker:
    """The tracker `train.tracking` names; a `NullTracker` where `enabled` is False (processes other than 0)."""
    if tracking not in TRACKERS:
        raise ConfigError(f"train.tracking={tracking!r}: expected one of {', '.join(TRACKERS)}")
    if not enabled or tracking == "none":
        return NullTracker()
    if tracking == "tensorboard":
        return TensorBoardTracker(run_dir)
    return MLflowTracker(run_dir, tracking_uri, experiment)


# ---------------------------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """metrics.jsonl (one JSON record a line), each record's numbers forwarded to the tracker."""

    def __init__(self, run_dir: Path, tracker: Tracker | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tracker = tracker if tracker is not None else NullTracker()
        self.file = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self, status: str = "FINISHED") -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.tracker.close(status)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
