"""Runs you can watch: logging.wandb sends metrics.jsonl's records to Weights & Biases (offline here: no
network), and ``python -m neo.plot`` draws runs' curves into one PNG. Both extras missing: one clear message.

One real tiny run serves both: W&B's offline run file is read back record by record, and the run is drawn.
"""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import sys

import pytest
from runs import ROOT, TINY, clean_env, run_training


def wandb_records(path: str) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``, what ``wandb sync`` uploads).

    The file is ``:W&B`` + a 3-byte version, then LevelDB's log format: 32 KiB blocks of records, each with
    a 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last part); wandb 0.31 no longer
    ships a Python reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, parts, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the zero padding at the end of a block
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


@pytest.fixture(scope="module")
def watched(sample_tokens, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("watched")
    run = run_training(run_dir, f"data.train_paths=[{sample_tokens}]", "schedule.iterations=6", "logging.interval=2",
                       "eval.interval=3", "eval.iters=1", "checkpoint.save_interval=0", "logging.wandb.project=neo-tests",
                       "logging.wandb.mode=offline")  # fmt: skip
    return run


def test_wandb_offline_gets_the_records_of_metrics_jsonl(watched):
    (log,) = glob.glob(str(watched.dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "neo-tests" and run.display_name == watched.dir.name
    assert run.run_id == (watched.dir / "wandb" / "neo-run-id").read_text().strip()  # kept for a resume
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item
            }
            rows[row["_step"]] = row
    steps = [r for r in watched.records if "loss" in r]
    assert sorted(rows) == [r["step"] for r in steps] == list(range(1, 7))
    for record in watched.records:  # every number of every step and validation record, at its step
        if "event" in record:
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                assert rows[record["step"]][key] == pytest.approx(value, rel=1e-12), (record["step"], key)
    assert {"tokens_per_s", "valid_loss", "grad_norm", "lr"} <= set(rows[6])
    summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update if i.key}  # fmt: skip
    assert summary["exit_code"] == 0 and summary["checkpoint"].endswith("iter_00000006")
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]


def test_plot_draws_real_runs_overlaid(watched, tmp_path):
    """The run and a second one (its metrics, shifted) in one PNG, each run in its own colour."""
    import numpy as np
    from matplotlib import colors, image

    other = tmp_path / "other"
    other.mkdir()
    with open(other / "metrics.jsonl", "w") as f:
        for r in watched.records:
            if "loss" in r:
                f.write(json.dumps(dict(r, loss=r["loss"] - 0.5)) + "\n")
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "neo.plot", str(watched.dir), str(other), "-o", str(out)],
                          capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
    pixels = image.imread(out)[..., :3]
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
    for color in ("C0", "C1"):  # the first run's colour and the second's appear as lines
        rgb = np.array(colors.to_rgb(color))
        assert (np.abs(pixels - rgb).max(axis=-1) < 0.05).sum() > 200, color


def test_plot_keeps_the_later_launch_of_a_step_logged_twice(tmp_path):
    from neo.plot import read_run

    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"event": "end", "step": 2, "exit_code": 75},
             {"step": 2, "loss": 2.5, "valid_loss": 2.7}, {"step": 3, "loss": 1.0}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')
    curves = read_run(str(tmp_path))
    assert curves["loss"] == [(1, 3.0), (2, 2.5), (3, 1.0)] and curves["valid_loss"] == [(2, 2.7)]
    assert "exit_code" not in curves


def test_missing_extras_are_one_clear_message(monkeypatch, tmp_path):
    import importlib.util

    from neo.config import ConfigError, load_config
    from neo.errors import NeoError
    from neo.plot import draw
    from neo.train.metrics import start_wandb

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"wandb package is not installed\. Fix: pip install wandb"):
        load_config([TINY], ["logging.wandb.project=p"])
    load_config([TINY], ["logging.wandb.project=p", "logging.wandb.mode=disabled"])  # disabled needs nothing
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # and no login on disk (netrc, W&B settings) either:
    for var in ("HOME", "WANDB_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(NeoError, match="wandb login.* or set logging.wandb.mode=offline"):
        start_wandb({"project": "p", "mode": "online", "dir": str(tmp_path)})  # not logged in: no traceback
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails
    with pytest.raises(NeoError, match="pip install wandb"):
        start_wandb({"project": "p", "mode": "offline"})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(NeoError, match="pip install matplotlib"):
        draw({"run": {"loss": [(1, 1.0)]}}, str(tmp_path / "x.png"))


def test_a_requeued_run_is_marked_preempting_in_wandb(tmp_path):
    """Exit 75 (saved after SIGTERM, to be run again): W&B hears "preempting", then the run's exit code."""
    from neo.train.metrics import MetricsWriter

    calls = []

    class FakeRun:
        summary: dict = {}

        def log(self, values, step):
            calls.append(("log", step, sorted(values)))

        def mark_preempting(self):
            calls.append(("preempting",))

        def finish(self, exit_code):
            calls.append(("finish", exit_code))

    writer = MetricsWriter(str(tmp_path))
    writer.wandb = FakeRun()
    writer.write({"step": 3, "loss": 2.0, "note": "text is not a curve"})
    writer.write({"event": "end", "step": 3, "exit_code": 75, "checkpoint": "c"})
    writer.close(75)
    assert calls == [("log", 3, ["loss"]), ("preempting",), ("finish", 75)]
    assert FakeRun.summary == {"exit_code": 75, "checkpoint": "c"}
