"""Run by tests under torchrun: train with the given --key=value flags, then every rank saves its own
parameters to <out_dir>/rank<r>.pt, so a test can check that the ranks stayed identical."""
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from configurator import parse  # noqa: E402

def signal_self_at(trainer, rank, step):
    """SIGTERM to this process inside step `step` (after its batch was drawn) when it is rank `rank`: a
    scheduler's stop that reaches one rank only."""
    real_step = trainer.train_step

    def train_step():
        if trainer.rt.rank == rank and trainer.iter_num == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step()
    trainer.train_step = train_step


if __name__ == '__main__':
    trainer = train.Trainer(parse(train.TrainConfig, sys.argv[1:]))
    if os.environ.get('SIGTERM_RANK_STEP'):  # "rank:step"
        signal_self_at(trainer, *map(int, os.environ['SIGTERM_RANK_STEP'].split(':')))
    trainer.run()
    torch.save(trainer.model.state_dict(), Path(trainer.cfg.out_dir) / f'rank{trainer.rt.rank}.pt')
    dist.destroy_process_group()
