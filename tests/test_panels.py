"""W&B panels for a sweep: the offline path for real (real offline runs, spec file, commands), the online path up
to the network call (the real wandb-workspaces Report, with `save` intercepted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ut_helpers import compose, job_for, offline_wandb_run, subprocess_env

from unified_train import rundir
from unified_train.results import panels


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep directory as a paired multirun leaves it (job files and real offline W&B runs; no training)."""
    root = tmp_path_factory.mktemp("sweep")
    for num, backend in enumerate(("mlm", "bridge")):
        cfg = compose([f"backend={backend}", "model=llama32_1b", "parallel.tp=2"])
        run_dir = root / f"{num}_{backend}"
        rundir.write_job_record(cfg, job_for(cfg, run_dir, root.name))
        offline_wandb_run(cfg, run_dir, root.name)
    return root


def test_offline_writes_the_spec_and_prints_sync_and_panel_commands(sweep):
    env = {k: v for k, v in subprocess_env().items() if k != "WANDB_API_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "unified_train.results.panels", str(sweep)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((sweep / panels.SPEC_FILE).read_text())
    pid = rundir.pair_id(compose(["model=llama32_1b", "parallel.tp=2"]))
    assert spec["project"] == "unified_train" and spec["entity"] is None
    [section] = spec["sections"]
    assert section["group"] == pid and section["job_types"] == ["bridge", "mlm"]
    assert section["name"] == f"pair {pid}: llama32_1b tp=2 pp=1"
    assert [(p["y"], p["groupby"]) for p in section["panels"]] == [(["lm loss"], "JobType"), (["grad-norm"], "JobType")]
    assert len(spec["offline_runs"]) == 2
    for run in spec["offline_runs"]:
        assert f"wandb sync -p unified_train {run}" in proc.stdout
    assert f"-m unified_train.results.panels --spec {sweep / panels.SPEC_FILE}" in proc.stdout


def test_online_builds_one_section_per_pair_and_saves(sweep, monkeypatch):
    import wandb_workspaces.reports.v2 as wr

    saved = []
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(wr.Report, "save", lambda self, **kw: saved.append(self))  # the network call
    monkeypatch.setattr(wr.Report, "url", property(lambda self: f"https://wandb.ai/{self.entity}/{self.project}/r"))
    assert panels.main([str(sweep), "--entity", "team", "--title", "pairs"]) == 0
    [report] = saved
    assert (report.entity, report.project, report.title) == ("team", "unified_train", "pairs")
    heading, grid = report.blocks[1:]
    pid = rundir.pair_id(compose(["model=llama32_1b", "parallel.tp=2"]))
    assert isinstance(heading, wr.H2) and pid in str(heading.text)
    [runset] = grid.runsets
    assert (runset.entity, runset.project) == ("team", "unified_train")
    assert runset.filters == f"Metric(\"Group\") == '{pid}'"  # wandb-workspaces' own filter string
    assert [(p.y, p.groupby) for p in grid.panels] == [(["lm loss"], "JobType"), (["grad-norm"], "JobType")]


def test_spec_file_recreates_the_same_report(sweep, monkeypatch):
    import wandb_workspaces.reports.v2 as wr

    spec = panels.build_spec([str(sweep)], entity="team")
    path = sweep / "spec_copy.json"
    path.write_text(json.dumps(spec))
    saved = []
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(wr.Report, "save", lambda self, **kw: saved.append(self))
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.ai/r"))
    assert panels.main(["--spec", str(path)]) == 0
    assert saved[0].blocks[2].runsets[0].filters == f"Metric(\"Group\") == '{spec['sections'][0]['group']}'"
    assert saved[0].title == spec["title"] == f"unified_train {sweep.name}"


def test_spec_without_an_api_key_is_refused(sweep, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    panels.main([str(sweep)])
    assert panels.main(["--spec", str(sweep / panels.SPEC_FILE)]) == 2
    assert "WANDB_API_KEY is not set" in capsys.readouterr().err
