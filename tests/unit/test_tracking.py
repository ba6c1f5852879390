"""atlas_jax/tracking.py against the real stores: an MLflow run in the local SQLite store (params,
metrics per step, loss.png and config.yaml as artifacts, read back with MlflowClient), a resume that
continues the same run, TensorBoard events, metrics.jsonl, and one-line errors for bad URIs."""
from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from atlas_jax.config import Config, save_config
from atlas_jax.errors import AtlasError, ConfigError
from atlas_jax.tracking import (RUN_ID_FILE, MetricsLog, MLflowTracker, NullTracker, TensorBoardTracker,
                                TrackingError, default_tracking_uri, default_ui_command, flatten_params,
                                make_tracker, read_metrics)

RECORDS = [{"step": 1, "loss": 4.5, "lr": 1e-4, "tokens_per_s": 1200, "note": "warmup", "nonfinite": False},
           {"step": 2, "loss": 4.0, "lr": 2e-4, "tokens_per_s": 1300},
           {"step": 3, "loss": 3.25, "lr": 3e-4, "val_loss": 3.5, "mesh": [1, 1]}]


def _png(path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.plot([r["step"] for r in RECORDS], [r["loss"] for r in RECORDS])
    fig.savefig(path)
    plt.close(fig)
    return path


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _train(run_dir: Path, records: list[dict], params: dict, status: str = "FINISHED") -> MLflowTracker:
    tracker = make_tracker("mlflow", None, run_dir, enabled=True)
    assert isinstance(tracker, MLflowTracker)
    tracker.log_params(params)
    log = MetricsLog(run_dir, tracker, enabled=True)
    for r in records:
        log.write(r)
    log.close(status)
    return tracker


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One training run into the local store <runs>/mlflow.db (MLflow builds the database once here)."""
    runs = tmp_path_factory.mktemp("runs")
    run_dir = runs / "shakespeare"
    run_dir.mkdir()
    cfg = Config()
    save_config(cfg, run_dir / "config.yaml")
    params = {**flatten_params(cfg), "train.notes": "x" * 10_000}
    tracker = make_tracker("mlflow", None, run_dir, enabled=True)
    tracker.log_params(params)
    log = MetricsLog(run_dir, tracker, enabled=True)
    for r in RECORDS:
        log.write(r)
    tracker.log_artifact(_png(run_dir / "loss.png"))
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "missing.png")  # skipped, not an error
    log.close("FINISHED")
    return {"runs": runs, "run_dir": run_dir, "cfg": cfg, "run_id": tracker.run_id,
            "client": MlflowClient(default_tracking_uri(run_dir))}


def test_default_store_is_sqlite_beside_the_run_dir(first_run):
    runs, run_dir = first_run["runs"], first_run["run_dir"]
    assert default_tracking_uri(run_dir) == f"sqlite:///{runs.resolve().as_posix()}/mlflow.db"
    assert (runs / "mlflow.db").is_file()
    assert default_ui_command(run_dir) == f"mlflow ui --backend-store-uri sqlite:///{runs.resolve().as_posix()}/mlflow.db"
    assert (run_dir / RUN_ID_FILE).read_text().strip() == first_run["run_id"]


def test_mlflow_run_has_params_metrics_per_step_and_artifacts(first_run):
    client, run_id, cfg = first_run["client"], first_run["run_id"], first_run["cfg"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "shakespeare"
    assert client.get_experiment(run.info.experiment_id).name == "atlas"
    assert run.data.tags["atlas.run_dir"] == str(first_run["run_dir"].resolve())

    params = run.data.params
    assert params["model.d_model"] == str(cfg.model.d_model)
    assert params["train.tracking"] == "tensorboard"
    assert params["train.tracking_uri"] == "None"
    assert params["train.mesh"] == "[-1, 1]"
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    assert len(params["train.notes"]) == MAX_PARAM_VAL_LENGTH and params["train.notes"].endswith("...")

    assert _history(client, run_id, "loss") == [(1, 4.5), (2, 4.0), (3, 3.25)]
    assert _history(client, run_id, "lr") == [(1, 1e-4), (2, 2e-4), (3, 3e-4)]
    assert _history(client, run_id, "tokens_per_s") == [(1, 1200.0), (2, 1300.0)]
    assert _history(client, run_id, "val_loss") == [(3, 3.5)]
    assert set(run.data.metrics) == {"loss", "lr", "tokens_per_s", "val_loss"}  # no step, strings, bools, lists

    arts = {a.path: a for a in client.list_artifacts(run_id)}
    assert set(arts) == {"loss.png", "config.yaml"}
    local = Path(client.download_artifacts(run_id, "config.yaml", str(first_run["runs"] / "dl")))
    assert local.read_bytes() == (first_run["run_dir"] / "config.yaml").read_bytes()
    assert run.info.artifact_uri.startswith((first_run["runs"] / "mlartifacts").resolve().as_uri())


def test_resume_continues_the_same_run(first_run):
    """Same run dir again: the same MLflow run, RUNNING while it trains, metrics continue by step;
    params are immutable, so a changed value lands as the tag resumed.<key>."""
    runs, client = first_run["runs"], first_run["client"]
    run_dir = runs / "resumed"
    params = {"train.steps": 3, "model.d_model": 64}
    first = _train(run_dir, RECORDS[:2], params, status="KILLED")
    assert not first.resumed and client.get_run(first.run_id).info.status == "KILLED"

    again = make_tracker("mlflow", None, run_dir, enabled=True)
    assert again.run_id == first.run_id and again.resumed
    assert client.get_run(again.run_id).info.status == "RUNNING"
    again.log_params({"train.steps": 6, "model.d_model": 64, "train.new_key": "x"})
    log = MetricsLog(run_dir, again)
    log.write(RECORDS[2])
    log.write({"step": 4, "loss": 3.0})
    log.close("FINISHED")

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "3", "model.d_model": "64", "train.new_key": "x"}
    assert run.data.tags["resumed.train.steps"] == "6"
    assert _history(client, run.info.run_id, "loss") == [(1, 4.5), (2, 4.0), (3, 3.25), (4, 3.0)]
    same_name = client.search_runs([run.info.experiment_id], filter_string="attributes.run_name = 'resumed'")
    assert [r.info.run_id for r in same_name] == [first.run_id]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_run_id_missing_from_the_store_starts_a_new_run(first_run):
    run_dir = first_run["runs"] / "moved"
    run_dir.mkdir()
    (run_dir / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    tracker = _train(run_dir, RECORDS[:1], {})
    assert not tracker.resumed and tracker.run_id != "0123456789abcdef0123456789abcdef"
    assert (run_dir / RUN_ID_FILE).read_text().strip() == tracker.run_id
    assert first_run["client"].get_run(tracker.run_id).info.run_name == "moved"


def test_disabled_or_none_tracks_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("mlflow", "tensorboard", "none"):
        tracker = make_tracker(name, None, run_dir, enabled=False)  # a process other than 0
        assert type(tracker) is NullTracker
        log = MetricsLog(run_dir, tracker, enabled=False)
        tracker.log_params({"a.b": 1})
        log.write(RECORDS[0])
        tracker.log_artifact(run_dir)
        log.close("FAILED")
    assert list(tmp_path.rglob("*")) == [run_dir]

    tracker = make_tracker("none", "sqlite:///unused.db", run_dir, enabled=True)
    assert type(tracker) is NullTracker
    log = MetricsLog(run_dir, tracker, enabled=True)
    log.write(RECORDS[0])
    log.close()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["metrics.jsonl", "run"]


def test_tensorboard_writes_an_events_file(tmp_path):
    tracker = make_tracker("tensorboard", None, tmp_path, enabled=True)
    assert isinstance(tracker, TensorBoardTracker)
    tracker.log_params({"model.d_model": 128})
    log = MetricsLog(tmp_path, tracker)
    for r in RECORDS:
        log.write(r)
    log.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    assert b"loss" in data and b"val_loss" in data and b"model.d_model" in data
    assert b"note" not in data  # strings are not scalars


def test_metrics_jsonl_round_trips(tmp_path):
    assert read_metrics(tmp_path) == []
    log = MetricsLog(tmp_path, NullTracker())
    records = RECORDS + [{"step": 4, "loss": float("nan")}]
    for r in records:
        log.write(r)
    log.close()
    log = MetricsLog(tmp_path)  # appends, as a resumed run does
    log.write({"step": 5, "loss": 2.5})
    log.close()
    back = read_metrics(tmp_path)
    assert back[:3] == RECORDS and math.isnan(back[3]["loss"]) and back[4] == {"step": 5, "loss": 2.5}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["scheme", "file_store", "sqlite_under_a_file", "http_no_server"])
def test_bad_tracking_uri_is_one_line(tmp_path, kind):
    (tmp_path / "afile").write_text("")
    uri = {"scheme": "bogus://nowhere",
           "file_store": (tmp_path / "mlruns").as_uri(),
           "sqlite_under_a_file": f"sqlite:///{tmp_path.as_posix()}/afile/mlflow.db",
           "http_no_server": f"http://127.0.0.1:{_closed_port()}"}[kind]
    with pytest.raises(TrackingError) as e:
        make_tracker("mlflow", uri, tmp_path / "run", enabled=True)
    msg = str(e.value)
    assert isinstance(e.value, AtlasError)
    assert "\n" not in msg and msg.startswith(f"train.tracking_uri={uri!r}") and "sqlite:///" in msg
    assert len(msg) < 600
    assert not (tmp_path / "run" / RUN_ID_FILE).exists()


def test_unknown_tracker_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.tracking='wandb'"):
        make_tracker("wandb", None, tmp_path, enabled=True)
