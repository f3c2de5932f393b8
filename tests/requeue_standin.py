"""A training job whose stack is a CPU stand-in, for the preemption path on a real Slurm cluster
(tests/test_slurm.py::test_a_preempted_job_saves_is_requeued_and_continues). Run like `python -m unified_train`:

    python tests/requeue_standin.py -m hydra/launcher=slurm ... checkpoint.resume=if_available

Everything but the stack is the real code: Hydra with conf/, hydra-submitit-launcher, `app.run` (the resume guard),
`run_job` (the resume decision, the metrics file across attempts, the signal relay) and the real translation of
checkpoint.* into megatron-core fields. The stand-in does what both stacks do with those fields: a handler that
only notes `exit_signal`, a save at the end of the iteration on it (or at save_interval) and a stop; a load from
`load` at `ckpt_step` (or the tracker's latest). Its state is one number, x <- 0.9 x + 1 per iteration, so a
resumed run's values show whether it continued from the saved state.
"""

from __future__ import annotations

import json
import os
import signal
import time

import hydra

STEP_S = 0.5
STATE = "state.json"


class StandInStack:
    name = "standin"

    def native_config(self, cfg, job):
        from unified_train import mcore_fields

        return {**mcore_fields.checkpoint(cfg, job), **mcore_fields.training(cfg)}

    def describe(self, native):
        return {}

    def export(self, native):
        return []

    def write_native(self, native, directory):
        with open(os.path.join(directory, "standin.json"), "w") as f:
            json.dump(native, f, default=str)

    def train(self, native, sink):
        from unified_train import rundir

        stop = []
        if native["exit_signal_handler"]:
            signal.signal(native["exit_signal"], lambda signum, frame: stop.append(signum))
        sink.training_started()
        iteration, x = 0, 1.0
        if native["load"]:
            iteration = native["ckpt_step"] or rundir.latest_iteration(native["load"])
            with open(os.path.join(rundir.iteration_dir(native["load"], iteration), STATE)) as f:
                x = json.load(f)["x"]
        while iteration < native["train_iters"]:
            iteration += 1
            time.sleep(STEP_S)
            x = 0.9 * x + 1.0
            sink.record_train(iteration, x, 1.0, 1e-4, STEP_S)
            if stop or iteration % native["save_interval"] == 0 or iteration == native["train_iters"]:
                self._save(native["save"], iteration, x)
            if stop:
                return  # both stacks leave the loop with SystemExit(0) here, which both adapters turn into a return

    @staticmethod
    def _save(checkpoints, iteration, x):
        from unified_train import rundir

        directory = rundir.iteration_dir(checkpoints, iteration)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, STATE), "w") as f:
            json.dump({"x": x}, f)
        with open(os.path.join(checkpoints, rundir.CHECKPOINT_TRACKER), "w") as f:  # last, as the stacks do
            f.write(str(iteration))

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
