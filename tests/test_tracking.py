"""The buffered MLflow tracker: records survive an unreachable server and arrive once it answers."""

from mlflow.tracking import MlflowClient

from pipeline.tracking import RUN_NAME_TAG, Tracker
from tests.conftest import free_port


def test_unreachable_server_keeps_records_and_says_so(caplog):
    t = Tracker(f"http://127.0.0.1:{free_port()}", "exp", "run-a")
    t.log_params({"a": 1})
    t.log_metrics({"loss": 1.0}, step=1)
    assert t.flush() is False
    assert t.pending == 2
    assert "unreachable" in caplog.text and "buffered" in caplog.text


def test_flush_sends_metrics_once_and_resumes_the_same_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "exp", "run-b", artifact_root=(tmp_path / "art").as_uri())
    t.log_params({"train.epochs": 3})
    for step in (1, 2, 3):
        t.log_metrics({"loss": 1.0 / step}, step=step)
    assert t.flush() and t.pending == 0
    assert t.flush()  # nothing left: no duplicates
    # A restarted worker finds the same run by its Glimpse run name.
    t2 = Tracker(uri, "exp", "run-b")
    assert t2.ensure_run() == t.run_id
    t2.log_metrics({"loss": 0.25}, step=4)
    assert t2.close()
    client = MlflowClient(uri)
    history = client.get_metric_history(t.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    run = client.get_run(t.run_id)
    assert run.data.params["train.epochs"] == "3" and run.data.tags[RUN_NAME_TAG] == "run-b"
    assert run.info.status == "FINISHED"
