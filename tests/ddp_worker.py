"""Run stage trainings under torchrun and save every rank's final weights (for tests/test_ddp.py).

    torchrun --nproc_per_node=2 tests/ddp_worker.py OUT 'energy --files ...' 'vae --files ...'"""
import importlib
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

out, jobs = Path(sys.argv[1]), sys.argv[2:]
rank, models, step = int(os.environ["RANK"]), [], common.optimizer_step


def spy(model, *args, **kw):  # remember the network this rank trains
    models[:] = [model]
    return step(model, *args, **kw)


common.optimizer_step = spy
common.destroy_distributed = lambda: None  # one process group for all jobs (re-joining one hangs)
for job in jobs:
    script, *argv = shlex.split(job)
    importlib.import_module(script).main(argv)
    state = {k: v for k, v in models[0].state_dict().items()}
    torch.save(state, out / f"{script}_rank{rank}.pt")
torch.distributed.destroy_process_group()
