"""Run by tests under torchrun: train with the given --key=value flags, then every rank saves its own
parameters to <out_dir>/rank<r>.pt, so a test can check that the ranks stayed identical."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from configurator import parse  # noqa: E402

if __name__ == '__main__':
    trainer = train.Trainer(parse(train.TrainConfig, sys.argv[1:]))
    trainer.run()
    torch.save(trainer.model.state_dict(), Path(trainer.cfg.out_dir) / f'rank{trainer.rt.rank}.pt')
    dist.destroy_process_group()
