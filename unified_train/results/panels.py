"""W&B panels for a sweep: a report with one section per pair group, each with the pair's verdict, `lm loss` and
`grad-norm` line plots grouped by job_type (the backend) and the runs table of that group. Each run's W&B summary
gets its pair's verdict (`unified_train/verdict`, `unified_train/verdict_detail`), read from the comparison's
comparison.json.

    python -m unified_train.results.panels SWEEP_DIR [SWEEP_DIR ...] [--project P] [--entity E] [--title T]
    python -m unified_train.results.panels --spec SWEEP_DIR/wandb_panels.json     # create it later, from the spec

With WANDB_API_KEY set, the report is created online with wandb-workspaces and its URL printed, and the verdicts are
written into the runs' summaries. Without one (or with --offline), the panel spec is written to
`<first sweep dir>/wandb_panels.json` and the `wandb sync` commands for the offline runs are printed, with the command
that creates the panels and writes the summaries once they are uploaded (an offline run cannot be changed after it
finished). The spec is read from the job directories (run.json, unified_config.yaml, the W&B run directories) and
the sweep's comparison.json, so any sweep directory works.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sys

from unified_train import rundir

METRICS = ("lm loss", "grad-norm")  # the keys both stacks log to W&B (MLM's and Bridge's training_log)
SPEC_FILE = rundir.WANDB_PANELS
VERDICT, VERDICT_DETAIL = "unified_train/verdict", "unified_train/verdict_detail"  # keys in each run's summary


def build_spec(
    sweep_dirs: list[str], project: str | None = None, entity: str | None = None, title: str | None = None
) -> dict:
    """The panels as plain data: project, entity, one section per pair id, and the offline runs to upload."""
    runs = [r for r in rundir.load_runs(sweep_dirs) if not r.is_preflight]
    if not runs:
        raise SystemExit(f"unified_train.results.panels: no training runs (run.json) under {', '.join(sweep_dirs)}")
    # A job that failed before it started training has no unified config; any other run's names the project.
    recorded = [r for r in runs if os.path.isfile(os.path.join(r.path, rundir.UNIFIED_CONFIG))]
    wandb_cfg = rundir.read_unified_config((recorded or runs)[0].path).logger.wandb
    verdicts = {}  # pair id -> its verdict, from the comparison of each sweep directory
    for sweep in sweep_dirs:
        verdicts.update((rundir.read_comparison(sweep) or {}).get("pairs", {}))
    sections: dict[str, dict] = {}
    for run in runs:
        job = run.job
        verdict = verdicts.get(run.pair_id)
        section = sections.setdefault(
            run.pair_id,
            {
                "name": f"pair {run.pair_id}: {job.model} tp={job.tp} pp={job.pp}"
                + (f": {verdict['verdict']}" if verdict else ""),
                "group": run.pair_id,
                "job_types": [],
                "verdict": {"verdict": verdict["verdict"], "detail": verdict["detail"]} if verdict else None,
                "runs": [],
                "panels": [{"type": "line", "title": m, "x": "Step", "y": [m], "groupby": "JobType"} for m in METRICS],
            },
        )
        section["job_types"] = sorted({*section["job_types"], run.backend})
        section["runs"] += [{"id": run_id, "job_type": run.backend} for run_id in wandb_run_ids(run.path)]
    offline = sorted(
        d
        for r in runs
        for d in glob.glob(os.path.join(r.path, rundir.WANDB_DIR, "**", "offline-run-*"), recursive=True)
        if os.path.isdir(d)
    )
    return {
        "title": title or f"unified_train {os.path.basename(os.path.abspath(sweep_dirs[0]))}",
        "project": project or wandb_cfg.project,
        "entity": entity or wandb_cfg.entity,
        "sections": [sections[k] for k in sorted(sections)],
        "offline_runs": offline,
    }


def wandb_run_ids(run_dir: str) -> list[str]:
    """The W&B runs a job's stack started (online or offline), by id: each run directory holds run-<id>.wandb."""
    found = glob.glob(os.path.join(run_dir, rundir.WANDB_DIR, "**", "run-*.wandb"), recursive=True)
    return sorted({os.path.basename(f)[len("run-") : -len(".wandb")] for f in found})


def summaries(spec: dict) -> dict[str, dict]:
    """W&B run id -> the summary values that carry its pair's verdict."""
    out = {}
    for section in spec["sections"]:
        verdict = section.get("verdict")
        for run in section.get("runs", []) if verdict else []:
            out[run["id"]] = {VERDICT: verdict["verdict"], VERDICT_DETAIL: verdict["detail"]}
    return out


def write_summaries(spec: dict) -> list[str]:
    """Each uploaded run's summary gets its pair's verdict (W&B's public API: needs the network and a key); returns
    the runs' paths."""
    values_by_run = summaries(spec)
    if not values_by_run:  # no comparison.json, or no W&B run
        return []
    import wandb

    api = wandb.Api()
    entity = spec["entity"] or api.default_entity
    paths = []
    for run_id, values in values_by_run.items():
        path = f"{entity}/{spec['project']}/{run_id}"
        api.run(path).summary.update(values)
        paths.append(path)
    return paths


def build_report(spec: dict):
    """The wandb-workspaces Report for a spec (no network: only `save()` talks to W&B)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    blocks = [wr.P("MLM vs Bridge pairs: one section per pair id (W&B group), lines by job_type (backend).")]
    for section in spec["sections"]:
        runset = wr.Runset(
            entity=spec["entity"],
            project=spec["project"],
            name=section["name"],
            filters=expr.And(expr.Metric("Group") == section["group"]),
        )
        panels = [wr.LinePlot(title=p["title"], x=p["x"], y=p["y"], groupby=p["groupby"]) for p in section["panels"]]
        verdict = section.get("verdict")
        blocks += [
            wr.H2(section["name"]),
            *([wr.P(f"verdict: {verdict['verdict']}: {verdict['detail']}")] if verdict else []),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ]  # the grid shows the runs table
    return wr.Report(
        project=spec["project"],
        entity=spec["entity"],
        title=spec["title"],
        description="unified_train paired runs",
        blocks=blocks,
    )


def create_online(spec: dict) -> str:
    if spec["entity"] is None:
        import wandb

        spec = {**spec, "entity": wandb.Api().default_entity}
    report = build_report(spec)
    report.save()
    write_summaries(spec)
    return report.url


def write_offline(spec: dict, out_dir: str) -> tuple[str, list[str]]:
    """Write the spec; return its path and the commands to run once online."""
    path = os.path.join(out_dir, SPEC_FILE)
    with open(path, "w") as f:
        json.dump(spec, f, indent=2)
    project = ["-p", spec["project"]] + (["-e", spec["entity"]] if spec["entity"] else [])
    commands = [shlex.join(["wandb", "sync", *project, run]) for run in spec["offline_runs"]]
    commands.append(shlex.join([sys.executable, "-m", __spec__.name, "--spec", path]))  # also writes the summaries
    return path, commands


def after_sweep(sweep_dir: str) -> None:
    """End of a multirun that logged to W&B: write the offline spec (no network) or say how to make the panels."""
    runs = glob.glob(os.path.join(sweep_dir, "**", rundir.WANDB_DIR, "**", "*run-*"), recursive=True)
    if not runs:  # logger=none, or no training job
        return
    spec = build_spec([sweep_dir])
    if spec["offline_runs"]:
        path, commands = write_offline(spec, sweep_dir)
        print(f"W&B panels spec written to {path}; to upload the runs and create the panels:")
        print("\n".join(f"  {c}" for c in commands))
    else:
        print(f"W&B panels for this sweep: {shlex.join([sys.executable, '-m', __spec__.name, sweep_dir])}")
    online = bool(summaries(spec)) and not spec["offline_runs"] and os.environ.get("WANDB_API_KEY")
    if online:  # the runs are uploaded already: their summaries get the verdict now
        try:
            print(f"W&B: the verdict is in the summary of {', '.join(write_summaries(spec))}")
        except Exception as exc:  # noqa: BLE001 -- the network: the comparison stands without it
            print(f"W&B: the verdicts could not be written ({type(exc).__name__}: {exc}); run the command above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unified_train.results.panels", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dirs", nargs="*")
    parser.add_argument("--spec", help="create the panels from a spec written offline")
    parser.add_argument("--project")
    parser.add_argument("--entity")
    parser.add_argument("--title")
    parser.add_argument("--offline", action="store_true", help="write the spec even if an API key is set")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if bool(args.spec) == bool(args.sweep_dirs):
        parser.error("give SWEEP_DIR(s) or --spec FILE")
    if args.spec:
        with open(args.spec) as f:
            spec = json.load(f)
    else:
        spec = build_spec(args.sweep_dirs, args.project, args.entity, args.title)
    if args.offline or not os.environ.get("WANDB_API_KEY"):
        if args.spec:
            print(
                "unified_train.results.panels: WANDB_API_KEY is not set: `wandb login` (or export it) first",
                file=sys.stderr,
            )
            return 2
        path, commands = write_offline(spec, args.sweep_dirs[0])
        print(f"W&B panels: offline; spec written to {path}. Once online, run:")
        print("\n".join(f"  {c}" for c in commands))
        return 0
    print(f"W&B report: {create_online(spec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
