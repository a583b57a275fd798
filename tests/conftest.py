"""Shared test setup: the repo root on sys.path, the embedded corpus prepared once, a tiny run config."""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One thread, here and in the scripts the tests start: on a busy small machine, OpenMP threads spin-wait
# for a descheduled sibling and a tiny model's ops slow down a hundredfold. Set, not defaulted: tests compare
# a script's weights with this process's bit for bit, and another thread count sums in another order.
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)

import train  # noqa: E402  (after the sys.path insert)


class Interrupting:
    """Mix in before any objective: Ctrl-C arrives when step `steps` + 1 asks for its batch. The run's
    method stays the objective's (train.method_name), so the plain objective resumes it."""
    steps, calls, wraps_objective = None, 0, True

    def __call__(self, model, data, ctx):
        if self.calls == self.steps:
            raise KeyboardInterrupt
        self.calls += 1
        return super().__call__(model, data, ctx)


class StopAfter(Interrupting, train.CausalLM):
    """The baseline objective, interrupted after `steps` steps."""

    def __init__(self, batch_size, steps):
        super().__init__(batch_size)
        self.steps = steps


@pytest.fixture(scope='session')
def stdlib_corpus():
    """data/stdlib/byte, prepared once per session (the loop would do it on first use, per test)."""
    import train
    return train.load_corpus(train.TrainConfig())


@pytest.fixture
def tiny_cfg(stdlib_corpus, tmp_path):
    """make(**overrides) -> a TrainConfig for a seconds-long CPU run in a fresh folder under tmp_path."""
    from train import TrainConfig

    def make(**overrides):
        base = dict(out_dir=str(tmp_path / 'run'), model='tiny', batch_size=8, budget_unit='iters', budget=10,
                    compile_loss=False, sample_tokens=0, peak_flops=1e12, eval_batches=4, eval_interval=1000,
                    log_interval=1)
        return TrainConfig(**{**base, **overrides})
    return make


@pytest.fixture
def text_name():
    """A corpus name under data/text/ (git-ignored) for a test's prepare, removed afterwards."""
    from data.loader import DATA_ROOT
    name = f'pytest_text_{os.getpid()}'
    yield name
    shutil.rmtree(DATA_ROOT / 'text' / name, ignore_errors=True)


TIMING_KEYS = {'wall', 'tokens_per_s', 'mfu', 'eta_s'}  # what two runs of the same steps may log differently


def read_log(out_dir):
    """A run folder's log.jsonl records."""
    import json
    return [json.loads(line) for line in (Path(out_dir) / 'log.jsonl').read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def load(out_dir):
    """A run folder's checkpoint, as a resume reads it."""
    return torch.load(Path(out_dir) / 'ckpt.pt', map_location='cpu', weights_only=True)


def run_script(*args, cwd=ROOT, env=None, timeout=120):
    """Run `python ARGS...` in the repo root like a user would; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
