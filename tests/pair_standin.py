"""A paired multirun whose stacks are a CPU stand-in with a chosen run-to-run noise, a chosen difference between the
backends and a chosen failure, for the comparison's verdicts, repeats, failure reports and W&B summaries
(tests/test_noise.py). Run like `python -m unified_train`:

    STANDIN='{"2": {"noise": {"mlm": 1e-3}, "offset": {"bridge": [1, 5e-4]}}}' \\
        python tests/pair_standin.py -m backend=mlm,bridge rng.seed=1,2 compare.repeats=2

Everything but the stack is the real code: Hydra with conf/ and the comparison callback, `app.run`, runtime/job.py
(its run directory, metrics sink, W&B environment and teardown), the repeats and the failure records. STANDIN maps
an rng.seed to the stand-in's behaviour for that pair:
- noise {backend: a}: repeat k of that backend's job adds k*a to every lm loss and k*a/2 to every grad norm (the
  main run adds nothing), so its noise floor is N*a after N repeats;
- offset {backend: [i, d]}: that backend's lm loss is d higher from iteration i on;
- fail [backend]: that backend's stack raises after its second iteration;
- exit [backend]: that backend's stack exits (SystemExit 3, as MLM's exit paths do) after its second iteration.
Like both stacks, the stand-in starts its own W&B run (offline here) when the native config names a project.
"""

from __future__ import annotations

import json
import os
import struct

import hydra

STANDIN = "STANDIN"


def fp32(x: float) -> float:
    """Both stacks record losses computed in fp32."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


class StandInStack:
    name = "standin"

    def native_config(self, cfg, job):
        from unified_train import mcore_fields, rundir

        parent, leaf = os.path.split(job.run_dir)
        return {
            "backend": job.backend,
            "iters": cfg.train.iters,
            "repeat": int(leaf) if os.path.basename(parent) == rundir.REPEATS else 0,
            "behaviour": json.loads(os.environ.get(STANDIN, "{}")).get(str(cfg.rng.seed), {}),
            **mcore_fields.logger(cfg, job),
            "checkpoint_save": mcore_fields.checkpoint(cfg, job)["save"],
        }

    def describe(self, native):
        return {}

    def export(self, native):
        return []

    def write_native(self, native, directory):
        with open(os.path.join(directory, "standin.json"), "w") as f:
            json.dump(native, f)

    def train(self, native, sink):
        backend, behaviour = native["backend"], native["behaviour"]
        wandb = None
        if native["wandb_project"]:  # as both stacks do, on their last rank
            import wandb

            wandb.init(dir=native["wandb_save_dir"], name=native["wandb_exp_name"], project=native["wandb_project"])
        sink.training_started()
        noise = native["repeat"] * behaviour.get("noise", {}).get(backend, 0.0)
        start, offset = behaviour.get("offset", {}).get(backend, [1, 0.0])
        for it in range(1, native["iters"] + 1):
            loss = fp32(10.0 - 0.1 * it + noise + (offset if it >= start else 0.0))
            grad_norm = fp32(2.0 / it + noise / 2)
            sink.record_train(it, loss=loss, grad_norm=grad_norm, lr=1e-4, seconds=0.01)
            if wandb is not None:
                wandb.log({"lm loss": loss, "grad-norm": grad_norm}, step=it)
            if it == 2 and backend in behaviour.get("fail", []):
                raise RuntimeError(f"stand-in stack of {backend} failed after iteration {it}")
            if it == 2 and backend in behaviour.get("exit", []):
                raise SystemExit(3)

    def teardown(self):
        pass


def _stand_in_for_the_gpu_node() -> None:
    """What a GPU node would provide: CUDA (for app.run's check) and the world process group (gloo here)."""
    import torch
    import torch.distributed as dist

    from unified_train import backends
    from unified_train.runtime import ranks

    torch.cuda.is_available = lambda: True
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ranks.free_port()), RANK="0", WORLD_SIZE="1")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    backends.get = lambda name: StandInStack()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> None:
    from unified_train import app

    _stand_in_for_the_gpu_node()
    app.run(cfg)


if __name__ == "__main__":
    from unified_train.config import register_configs

    register_configs()
    main()
