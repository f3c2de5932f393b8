"""W&B: both stacks call wandb.init(dir, name, project, config, entity) themselves, on the last rank. Grouping
travels in the environment that call reads, so the runs carry it without touching either stack."""

from __future__ import annotations

import json
import os
import sys

from unified_train import rundir

_WANDB_KEYS = ("WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_TAGS", "WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")


def wandb_mode(cfg) -> str:
    if cfg.logger.wandb.mode:
        return cfg.logger.wandb.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_env(cfg, job: rundir.JobIdentity) -> dict[str, str | None]:
    """group = the pair id (identical for both halves of a pair), job_type = the backend, tags, mode, dir.
    None values mean: remove from the environment (logger=none, or a previous job's settings)."""
    if not cfg.logger.wandb.enabled:
        return {key: None for key in _WANDB_KEYS}
    tags = [job.model, f"tp{job.tp}", f"pp{job.pp}", f"sweep:{job.sweep_id}"]
    return {
        "WANDB_RUN_GROUP": job.pair_id,
        "WANDB_JOB_TYPE": job.backend,
        "WANDB_TAGS": ",".join(tags),
        "WANDB_MODE": wandb_mode(cfg),
        "WANDB_DIR": job.subdir(rundir.WANDB_DIR),
        "WANDB_SILENT": "true",
    }


def apply_env(env: dict[str, str | None]) -> None:
    """Set (or remove) the variables; the W&B directory must exist, or wandb falls back to a temp dir."""
    if env.get("WANDB_DIR"):
        os.makedirs(env["WANDB_DIR"], exist_ok=True)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def add_unified_config(unified: dict) -> None:
    """Put the unified config next to the stack's native config in the W&B run the stack started."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.config.update({"unified": unified}, allow_val_change=True)


def end_run() -> None:
    """After a job: finish the W&B run its stack started and drop wandb's process-wide state. wandb reads
    WANDB_JOB_TYPE, WANDB_TAGS, ... once per process, so without this the next job in the same process (the other
    half of a pair) would log under this job's job_type and tags."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def read_offline_run(path: str) -> dict:
    """Read an offline run back from its `run-<id>.wandb` file: identity, config and metric history."""
    import glob

    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    files = (
        [path]
        if path.endswith(".wandb")
        else sorted({os.path.realpath(f) for f in glob.glob(os.path.join(path, "**", "run-*.wandb"), recursive=True)})
    )
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {path}, found {len(files)}")
    store = datastore.DataStore()
    store.open_for_scan(files[0])
    out: dict = {"config": {}, "history": []}
    while True:
        data = store.scan_data()
        if data is None:
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.update(
                run_id=r.run_id,
                project=r.project,
                group=r.run_group,
                job_type=r.job_type,
                name=r.display_name,
                tags=list(r.tags),
            )
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
    return out
