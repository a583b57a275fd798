"""Measure a Reference System Time cost table on this machine (budget.py reads it).

RST (No Train No Gain, arXiv 2307.06440) charges each step the time it takes on a reference machine,
looked up in a table that is measured once: this command builds the run's model, a batch of its
shapes and every optimizer, times each kind of step (forward+backward per number of active blocks, a
forward-only scoring pass, each optimizer's update, Sophia-G's Hessian step; the median of repeated
timings after warm-up) and writes config/rst/<shape>.json, or --rst_table=PATH. It is a file of its own
because it builds models (train.py) while budget.py, which charges from the tables, imports no loop.

    python calibrate.py                                              # the default run's shape, this CPU
    python calibrate.py config/gpt2_124m.py --device=cuda --rst_repeats=3     # GPT-2 124M on fineweb_edu, this GPU
"""
import budget
import train
from configurator import cli


def main(cfg):
    return budget.calibrate(cfg, *train.calibration_inputs(cfg))


if __name__ == '__main__':
    cli(main, train.TrainConfig)
