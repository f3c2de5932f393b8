"""W&B panels for a sweep: a report with one section per pair group, each with `lm loss` and `grad-norm` line
plots grouped by job_type (the backend) and the runs table of that group.

    python -m unified_train.results.panels SWEEP_DIR [SWEEP_DIR ...] [--project P] [--entity E] [--title T]
    python -m unified_train.results.panels --spec SWEEP_DIR/wandb_panels.json     # create it later, from the spec

With WANDB_API_KEY set, the report is created online with wandb-workspaces and its URL printed. Without one
(or with --offline), the panel spec is written to `<first sweep dir>/wandb_panels.json` and the `wandb sync`
commands for the offline runs are printed, with the command that creates the panels once they are uploaded.
The spec is read from the job directories (run.json, unified_config.yaml), so any sweep directory works.
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


def build_spec(
    sweep_dirs: list[str], project: str | None = None, entity: str | None = None, title: str | None = None
) -> dict:
    """The panels as plain data: project, entity, one section per pair id, and the offline runs to upload."""
    runs = [r for r in rundir.load_runs(sweep_dirs) if not r.is_preflight]
    if not runs:
        raise SystemExit(f"unified_train.results.panels: no training runs (run.json) under {', '.join(sweep_dirs)}")
    wandb_cfg = rundir.read_unified_config(runs[0].path).logger.wandb
    sections: dict[str, dict] = {}
    for run in runs:
        job = run.job
        section = sections.setdefault(
            run.pair_id,
            {
                "name": f"pair {run.pair_id}: {job.model} tp={job.tp} pp={job.pp}",
                "group": run.pair_id,
                "job_types": [],
                "panels": [{"type": "line", "title": m, "x": "Step", "y": [m], "groupby": "JobType"} for m in METRICS],
            },
        )
        section["job_types"] = sorted({*section["job_types"], run.backend})
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
        blocks += [
            wr.H2(section["name"]),
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
    return report.url


def write_offline(spec: dict, out_dir: str) -> tuple[str, list[str]]:
    """Write the spec; return its path and the commands to run once online."""
    path = os.path.join(out_dir, SPEC_FILE)
    with open(path, "w") as f:
        json.dump(spec, f, indent=2)
    project = ["-p", spec["project"]] + (["-e", spec["entity"]] if spec["entity"] else [])
    commands = [shlex.join(["wandb", "sync", *project, run]) for run in spec["offline_runs"]]
    commands.append(shlex.join([sys.executable, "-m", __spec__.name, "--spec", path]))
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
