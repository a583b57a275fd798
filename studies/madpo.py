"""The MADPO study: DPO, cDPO, IPO, beta-DPO and MADPO compared by reward at matched KL, over seeds.

MADPO (arXiv 2510.05342 v1) ran its baselines on one seed and compared final rewards. Here every arm
(ARMS) runs at every beta of --betas on every pair tier (high: on-policy pairs, medium: half replaced by
easy off-policy pairs, low: all replaced) and seed; each po run is scored along training, and the arms are
compared by reward at matched KL to the SFT reference on their reward-vs-KL frontiers (studies/madpo_report.py),
because a higher reward bought with more KL is no win. MADPO's margins come from the trained reward model,
the true r_w - r_l (madpo4_oracle) or the oracle plus noise (madpo4_noisy): how much the reward model's
errors cost.

Each run is one stage of madpo.py (`python madpo.py --stage=... --k=v`), stage by stage (sft -> pairs -> rm
-> po: each reads the files of the ones before). A stage is reused only while its folder's config.json
records the keys that decide it (madpo.stage_keys: its own and those of the stages it reads); a killed one
resumes, any other runs again. Rerun the same command to continue an interrupted study.

    python -m studies.madpo --jobs=2                # 3 seeds x 3 tiers x 9 arms x 3 betas: 243 po runs
    python -m studies.madpo --quick=True            # a few-minute smoke run (one seed, beta 0.1)
    python -m studies.madpo --stage=compare         # tables and figures from whatever has finished
    python -m studies.madpo precision --jobs=2      # issue 36's design: high tier, 5 arms x 4 betas x 6 seeds, 640 prompts

Cost: the sft and pairs stages run once per seed, rm once per seed and tier, po once per seed, tier, arm
and beta (each extra beta adds 27 po runs per seed); po run time grows with --po_iters, --po_points and
--n_eval. The default betas span the matched KLs: at larger betas most losses stay below the first matched
KL, at the smallest DPO and cDPO overshoot the last by far.
"""
import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

import madpo
from configurator import check_distinct, cli_designs, key, require
from data.reviews.pairs import TIERS
from data.reviews.prepare import ensure_prepared, vader
from data.loader import EPOCH_SEEDS, MAX_SEED
from runs import free_memory
from studies.madpo_report import compare, read_done
from studies.plan import Run, run_plan

ARMS = {  # the study's arms: name -> the po keys that make it (madpo.method_name inverts it)
    'dpo': dict(loss='dpo'), 'cdpo': dict(loss='cdpo'), 'ipo': dict(loss='ipo'), 'ipo_avg': dict(loss='ipo', ipo_average=True),
    'bdpo': dict(loss='bdpo'), 'madpo2': dict(loss='madpo', c_max=2.0), 'madpo4': dict(loss='madpo', c_max=4.0),
    'madpo4_oracle': dict(loss='madpo', c_max=4.0, margins='oracle'),
    'madpo4_noisy': dict(loss='madpo', c_max=4.0, margins='noisy'),
    'madpo4_tq0.5': dict(loss='madpo', c_max=4.0, tau_quantile=0.5)}  # tau at the median |m|: both branches of w act
SWEPT_KEYS = (('seeds', '(0, 1, 2)'), ('arms', "('dpo', 'madpo4')"), ('betas', '(0.1,)'), ('tiers', "('high',)"))  # and an example
PER_RUN = ('seed', 'tier', 'beta', 'loss', 'c_max', 'margins', 'ipo_average', 'tau_quantile', 'init_from', 'overwrite', 'threads')
RUN_BYTES = 2**29  # the memory of one running stage: a Python process with torch and a tiny model (~0.4 GiB measured)
OUTPUTS = {'sft': ('ckpt.pt',), 'pairs': tuple(f'{t}.pt' for t in TIERS), 'rm': ('rm.pt',), 'po': ()}  # what later stages read


@dataclass(frozen=True)
class MadpoStudyConfig(madpo.MadpoConfig):
    """madpo.py's keys, passed on to every stage that reads them, and the study's own."""
    QUICK: ClassVar[dict] = dict(seeds=(0,), betas=(0.1,), sft_iters=1500, n_pairs=1500, val_pairs=100, po_pairs=1500,
                                 po_val_pairs=100, rm_iters=300, po_iters=60, po_points=2, n_eval=100)
    stage: str = key('all', ('all', 'compare'))  # all: every stage's runs, then compare; compare: tables from what has finished
    seeds: tuple = key((0, 1, 2), '>=0')  # each seed has its own SFT model, pairs, reward models and po runs
    quick: bool = False              # a few-minute smoke run (QUICK's values for the keys not given)
    arms: tuple = tuple(ARMS)        # the po arms to run (compare: the rows)
    betas: tuple = key((0.01, 0.03, 0.1), '>0')  # each arm runs at each beta (each beta: 27 po runs per seed)
    tiers: tuple = tuple(TIERS)      # the pair tiers to run
    jobs: int = key(1, '>0')         # runs at once, the CPU threads split between them
    matched_kls: tuple = key((2.0, 5.0), '>0')  # compare: the KLs (nats) at which rewards are read

    def __post_init__(self):
        super().__post_init__()
        require(set(self.arms) <= set(ARMS), f"--arms must be among {', '.join(ARMS)}, got {self.arms}")
        require(set(self.tiers) <= set(TIERS), f"--tiers must be among {', '.join(TIERS)}, got {self.tiers}")
        for name, example in SWEPT_KEYS:
            check_distinct(name, getattr(self, name), example)
        given = [f'--{k}' for k in PER_RUN if getattr(self, k) != getattr(madpo.MadpoConfig, k)]
        require(not given, f"{', '.join(given)}: the study sets these per run (--seeds, --tiers, --betas, --arms; "
                           f"a finished stage is reused, a killed one resumed); one run: python madpo.py --stage=...")
        require(max(self.seeds) <= MAX_SEED, f'--seeds holds {max(self.seeds)}, beyond what the pair order takes (seed '
                                             f'x {EPOCH_SEEDS:,} + epoch seeds a generator, below 2**64): give seeds <= {MAX_SEED:,}')
        fits = free_memory(torch.device('cpu')) // RUN_BYTES
        require(self.jobs <= fits, f'--jobs={self.jobs} starts that many runs at once, each a Python process with torch '
                                   f'(~{RUN_BYTES / 2**30:.1f} GiB), more than the free memory holds: give at most {fits}')


@dataclass(frozen=True)
class PrecisionConfig(MadpoStudyConfig):
    """`python -m studies.madpo precision` (issue 36): the arms that decide the paper's ordering, on the high tier,
    with enough seeds, checkpoints and prompts to separate them; its own folder. Every arm gets the same betas,
    which put every arm's checkpoints on both sides of 2 and 5 nats: in out/records/madpo-2026-11-30 IPO stayed
    below 5 nats on most seeds at 0.01, hence 0.003; each run's 12 checkpoints fill the KLs below its last, so
    a beta above 0.1 would add points where there are many already."""
    QUICK: ClassVar[dict] = {**MadpoStudyConfig.QUICK, 'po_points': 2, 'n_eval': 100}
    out_dir: str = key('out/madpo_precision', 'path')  # every stage: its own sft, pairs, reward models and po runs
    seeds: tuple = key((0, 1, 2, 3, 4, 5), '>=0')  # 6 seeds: a ±0.1 half-width per arm at 640 prompts (issue 36)
    arms: tuple = ('dpo', 'ipo', 'madpo4', 'madpo4_tq0.5', 'madpo4_oracle')  # MADPO at the paper's tau and at the median |m|
    betas: tuple = key((0.003, 0.01, 0.03, 0.1), '>0')  # every arm: both sides of 2 and 5 nats
    tiers: tuple = ('high',)         # on-policy pairs, where the reward model's margins matter most
    po_points: int = key(12, '>0')   # po: checkpoints along each run
    n_eval: int = key(640, '>0')     # po: held-out prompts per checkpoint (a KL half-width half the 160's)


@dataclass
class StageRun(Run):
    """A madpo.py stage: its --out_dir is the study's folder, the run's own folder (madpo.folder) one below."""
    folder: Path = None

    @property
    def out_dir(self):
        return self.folder


def stage_finished(stage, folder):
    """Its done.json (read back: a damaged one is refused, naming the fix) and the files later stages read."""
    folder = Path(folder)
    return ((folder / 'done.json').is_file() and bool(read_done(folder / 'done.json', stage))
            and all((folder / name).is_file() for name in OUTPUTS[stage]))


def stage_run(cfg, stage, **per_run):
    """One run of madpo.py: the keys that decide the stage (madpo.stage_keys) at the study's values, with
    this run's seed, tier, arm and beta."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(madpo.MadpoConfig)}
    run = madpo.MadpoConfig(**{**shared, 'stage': stage, 'out_dir': str(Path(cfg.out_dir).resolve()), **per_run})
    folder = madpo.folder(run, stage)
    args = {'stage': stage, 'out_dir': run.out_dir, **madpo.stage_keys(run, stage)}
    return StageRun(str(folder.relative_to(run.out_dir)), 'madpo.py', args, finished=partial(stage_finished, stage),
                    folder=folder)


def arm_keys(arm):
    return {'ipo_average': False, 'margins': 'rm', 'tau_quantile': 0.0, **ARMS[arm]}


def study_plan(cfg):
    """[(stage, its runs)] in stage order, so that ceilings and reward models come first; the po runs tier
    by tier and arm by arm (every seed and beta of an arm together: a partial study holds whole cells)."""
    return [('sft', [stage_run(cfg, 'sft', seed=s) for s in cfg.seeds]),
            ('pairs', [stage_run(cfg, 'pairs', seed=s) for s in cfg.seeds]),
            ('rm', [stage_run(cfg, 'rm', seed=s, tier=t) for s in cfg.seeds for t in cfg.tiers]),
            ('po', [stage_run(cfg, 'po', seed=s, tier=t, beta=b, **arm_keys(arm))
                    for t in cfg.tiers for arm in cfg.arms for s in cfg.seeds for b in cfg.betas])]


def run_study(cfg):
    """Every stage's runs, stage by stage; a damaged done.json is refused before any stage runs, not after
    hours of them."""
    if cfg.scorer == 'vader':  # the pairs and po stages score with it: missing, refused now, not after the SFT runs
        vader()
    plan = study_plan(cfg)
    for _, runs in plan:
        for run in runs:
            if (run.out_dir / 'done.json').exists():
                read_done(run.out_dir / 'done.json', run.args['stage'])
    ensure_prepared(cfg.dataset)  # once, before parallel runs would each prepare it
    for i, (stage, runs) in enumerate(plan, 1):
        print(f'=== stage {i}/{len(plan)}: {stage}, {len(runs)} run(s)', flush=True)
        for run in runs:
            if run.is_done():
                print(f'{run.out_dir}: done, skipped', flush=True)
        run_plan(runs, cfg.jobs)


def main(cfg):
    if cfg.stage == 'all':
        run_study(cfg)
    return compare(cfg.out_dir, cfg.arms, cfg.matched_kls)


DESIGNS = {'precision': PrecisionConfig}  # python -m studies.madpo <design> [--key=value ...]


if __name__ == '__main__':
    cli_designs(main, MadpoStudyConfig, DESIGNS)
