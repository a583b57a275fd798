"""The Rho-1 SLM study on mathmix: does training on the tokens of highest excess loss (slm.py) learn the
held-out facts from noisy data sooner than training on every token (CLM), and which tokens does it pick?

The task is Rho-1's setting reduced to a CPU: a reference model trained directly on clean facts, not the
paper's recipe (a base model that can copy, fine-tuned into the reference, then continued pretraining):
copying never formed at CPU size, and that recipe puts three trainings before the first arm. Unseen
operand pairs test generalisation, not recall; every token's kind is known, so the selection rate per
kind and the oracle arm are exact.

The study, in order (an interrupted one has whole comparisons first): the reference (train.py on the
clean corpus); gate 1, its held-out exact match >= --gate_ref; the cache of its losses per noise level;
the oracle arm's first seed; gate 2, its exact match >= --gate_oracle (a failing gate stops with one line);
then clm, excess (SLM), reference, train, random, oracle x --seeds at --noise, excess at each --k_sweep,
and clm and excess at each --noise_sweep over --sweep_seeds seeds, --jobs runs at a time; then the report
(studies/slm_report.py). Every run is one library command run by studies.plan: a finished run of the same
keys is skipped, a killed one resumes.

    python -m studies.slm                          # the study (its cost: README)
    python -m studies.slm --quick=True             # a few-minute smoke study (gates printed, not enforced)
    python -m studies.slm --stage=compare          # the report of the runs under --out_dir
    python -m studies.slm --stage=export --k=0.6   # the static "concentrated" mask of select_by='reference'

The coin control's study (ControlConfig, issue 36): clm, SLM (excess) and slm_coin_control (slm.py's
--select=coin_control: SLM with its choice among the operand bytes replaced by a coin at SLM's rate for each,
blind to their excess loss; a control that reads the task's labels, not a method) at noise 0.4 and k 0.6 over 10 paired seeds, in its own
folder; the same plan, gates and runs, then studies/slm_report.py's control report (control.md): failures
per arm (exact intervals, Fisher's test), tokens to 50% non-trap exact match, selection and excess by byte role.

    python -m studies.slm control                  # 31 runs and the reference: ~55 min wall at --jobs=2 on 2 cores
    python -m studies.slm control --quick=True     # its smoke size
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import runs
import slm
from configurator import UserError, cli_designs, key, require
from data.loader import MAX_SEED, DataError, atomic_write_bytes, file_sha256, num_examples, read_result
from data.mathmix.fewshot import clean_val, exact_match, line_losses, load_problems
from data.mathmix.prepare import KINDS, check_noise_levels, corpus_name, ensure_prepared, load_kinds
from model import evaluate
from runs import free_memory
from studies.plan import Run, run_plan
from studies.slm_report import ARM_KEYS, REF_FIX, REF_KEYS, RESULT_FIX, control_report, report

ARMS = ('clm',) + slm.SELECT_BY  # the study's arms
CONTROL = 'slm_coin_control'     # SLM with the coin control (slm.py --select=coin_control): an arm --arms may name
ARM_RESULT_KEYS = {**ARM_KEYS, 'run_config': dict}  # what arm_finished reads back


@dataclass(frozen=True)
class StudyConfig(slm.SLMConfig):
    """slm.py's keys, which every run of the study gets, and the study's own."""
    ARM_STAGES: ClassVar[tuple] = ('all',)
    QUICK: ClassVar[dict] = dict(budget=1e5, ref_budget=1.5e5, eval_interval=40, seeds=2, arms='clm,excess,oracle',
                                 noise_sweep=(), k_sweep=(), gate_ref=0.0, gate_oracle=0.0)
    stage: str = key('all', ('all', 'compare', 'export'))  # all (the study: ref, gates, runs, compare), compare, export
    quick: bool = False             # every stage: QUICK's values for the keys not given
    noise: float = key(0.2, '[0,1)')  # all (the arms' comparison), export: which noisy corpus
    noise_sweep: tuple = key((0.0, 0.4), '[0,1)')  # all: further noise levels, each with clm and excess at --k
    k_sweep: tuple = key((0.4, 0.8), '(0,1]')  # all: further k for excess at --noise
    arms: str = ','.join(ARMS)      # all: the arms compared at --noise (the oracle always runs first: a gate)
    seeds: int = key(5, '>0')       # all: seed, seed+1, ... for the arms at --noise
    sweep_seeds: int = key(3, '>0')  # all: the k and noise sweeps run the first sweep_seeds of the seeds
    jobs: int = key(2, '>0')        # all: runs at once after the gates, the CPU threads split between them
    gate_ref: float = key(0.8, '[0,1]')  # all: the reference's held-out exact match must reach this
    gate_oracle: float = key(0.5, '[0,1]')  # all: and the oracle arm's (first seed)

    def __post_init__(self):
        super().__post_init__()
        require(set(self.arms.split(',')) <= {*ARMS, CONTROL}, f"--arms: a comma list of {', '.join((*ARMS, CONTROL))}")
        require(not self.run_dir, '--run_dir names one arm\'s folder: the study names each of its own')
        require(not self.overwrite, '--overwrite: the study reuses the finished runs of the same keys and resumes '
                                    'killed ones; to start afresh, give another --out_dir')

    def check_sizes(self):
        """slm.py's, for every seed and sweep value of the study, and the plan's size against the free memory."""
        super().check_sizes()
        last = self.seed + self.seeds - 1
        require(last <= MAX_SEED, f'--seeds={self.seeds} from --seed={self.seed} reaches seed {last}, beyond what the data '
                                      f'order takes: give --seeds <= {MAX_SEED - self.seed + 1:,}')
        check_noise_levels('noise_sweep', self.noise_sweep)
        for k in self.k_sweep:
            slm.check_k('k_sweep', k, self.batch_size * self.model_dims()['block_size'])
        per_seed = len(self.arms.split(',')) + 1 + len(self.k_sweep) + 2 * len(self.noise_sweep)  # at most
        free = free_memory(torch.device('cpu'))
        require(self.seeds * per_seed * PLAN_BYTES <= free, f'--seeds={self.seeds:,} plans up to {self.seeds * per_seed:,} '
                f'runs, whose plan and results (~{PLAN_BYTES // 1024} KiB a run) exceed the free memory: give --seeds <= '
                f'{free // (per_seed * PLAN_BYTES):,}')
        require(self.jobs <= free // RUN_BYTES, f'--jobs={self.jobs} starts that many runs at once, each a Python process '
                f'with torch (~{RUN_BYTES / 2**30:.1f} GiB), more than the free memory holds: give at most {free // RUN_BYTES}')

    def key_defaults(self):
        return super().key_defaults() | (self.QUICK if self.quick else {})


@dataclass(frozen=True)
class ControlConfig(StudyConfig):
    """`python -m studies.slm control`: the study with the coin control's defaults (the keys are the study's)."""
    QUICK: ClassVar[dict] = {**StudyConfig.QUICK, 'arms': f'clm,excess,{CONTROL}'}
    out_dir: str = slm.default('out_dir', 'out/slm_control')  # all: its own reference, runs and report
    noise: float = key(0.4, '[0,1)')  # all: where SLM failed on 2 of 3 seeds (out/records/slm-2026-11-30)
    noise_sweep: tuple = key((), '[0,1)')  # all: none
    k_sweep: tuple = key((), '(0,1]')  # all: none
    arms: str = f'clm,excess,{CONTROL}'  # all: CLM, SLM and its control, paired by seed
    seeds: int = key(10, '>0')       # all: seed, seed+1, ... for every arm


PLAN_BYTES = 2**14  # a planned run: its config, command and job (~4 KiB measured), its eval.json and curve read back
RUN_BYTES = 2**29   # a running arm: a Python process with torch and a small model (~0.4 GiB measured)


# -----------------------------------------------------------------------------
# the plan: the reference, then every arm, each a command of the library

def arm_spec(arm, k):
    """(select_by, k, select) of an arm: clm trains on every token, the oracle on the clean ones, the control
    is SLM's selection with the coin on the operands."""
    return {'clm': ('excess', 1.0, 'topk'), 'oracle': ('oracle', 1.0, 'topk'),
            CONTROL: ('excess', k, 'coin_control')}.get(arm, (arm, k, 'topk'))


def arm_config(cfg, noise, select_by, k, seed, ref_sha='', select='topk'):
    """One arm as `python slm.py --stage=train` runs it: cfg's slm.py keys, its reference (pinned by its
    sha256: an arm trained with another one is not this arm) and its folder named."""
    own = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(slm.SLMConfig)}
    arm = slm.SLMConfig(**{**own, 'stage': 'train', 'noise': noise, 'select_by': select_by, 'k': k, 'seed': seed,
                           'select': select, 'init_from': 'scratch', 'ref_sha256': ref_sha})
    paths = slm.get_paths(cfg)
    return dataclasses.replace(arm, ref_ckpt=str(paths.ref_ckpt), run_dir=str(paths.run_dir(arm)))


def study_runs(cfg, ref_sha=''):
    """Every arm of the study in order: the oracle's first seed (a gate; its other seeds only when --arms names
    it), the arms at --noise seed by seed, then the k sweep, then the noise sweep (an interrupted study has
    whole comparisons first)."""
    named, seeds = cfg.arms.split(','), range(cfg.seed, cfg.seed + cfg.seeds)
    gate = lambda seed: ['oracle'] if seed == cfg.seed or 'oracle' in named else []  # noqa: E731
    cells = [(cfg.noise, *arm_spec(a, cfg.k), seed) for seed in seeds for a in gate(seed) + named]
    cells += [(cfg.noise, *arm_spec('excess', k), seed) for seed in seeds[:cfg.sweep_seeds] for k in cfg.k_sweep]
    cells += [(f, *arm_spec(a, cfg.k), seed) for seed in seeds[:cfg.sweep_seeds] for f in cfg.noise_sweep
              for a in ('clm', 'excess')]
    return [arm_config(cfg, noise, select_by, k, seed, ref_sha, select)
            for noise, select_by, k, select, seed in dict.fromkeys(cells)]


class ArmRun(Run):
    """An arm's folder is its --run_dir (slm.py's --out_dir holds the reference and every arm)."""

    @property
    def out_dir(self):
        return Path(self.args['run_dir'])


def arm_args(arm):
    return {k: v for k, v in dataclasses.asdict(arm).items() if k not in ('out_dir', 'dataset')}  # slm.py sets both


def arm_finished(folder, args):
    """Its eval.json (written when its budget was spent) records these keys: one of an earlier plan, or of
    a run replaced since, does not count."""
    path = Path(folder) / 'eval.json'
    if not path.exists():
        return False
    recorded = read_result(path, ARM_RESULT_KEYS, RESULT_FIX)['run_config']
    return all(recorded.get(k) == v for k, v in json.loads(json.dumps(args)).items() if k not in ('init_from', 'overwrite'))


def arm_run(arm):
    args, folder = arm_args(arm), Path(arm.run_dir)
    return ArmRun(f'{folder.parent.name}/{folder.name}', 'slm.py', args, finished=lambda out_dir: arm_finished(out_dir, args))


def reference_run(cfg, paths):
    """The reference is a plain train.py run (slm.ref_config); one of these keys that finished is reused."""
    ref = slm.ref_config(dataclasses.replace(cfg, init_from='scratch'), paths)
    return Run('reference', 'train.py', dataclasses.asdict(ref))


# -----------------------------------------------------------------------------
# gates and caches

def reference_eval(cfg, paths):
    """The reference model's held-out exact match and clean val loss, measured once per checkpoint."""
    path, sha = paths.ref_ckpt.parent / 'eval.json', file_sha256(paths.ref_ckpt)
    saved = read_result(path, REF_KEYS, REF_FIX) if path.exists() else {}
    if saved.get('ref_ckpt_sha256') == sha:
        return saved
    rt = runs.setup_device(cfg)
    model = runs.load_model(paths.ref_ckpt, rt.device, cfg.compile_loss)
    val_x, val_y = clean_val(paths.ref_data, model.config.block_size, cfg.eval_batches * cfg.batch_size)
    out = {'run': 'ref', 'arm': 'reference (clean data)', 'ref_ckpt_sha256': sha,
           'tokens': runs.load_checkpoint(paths.ref_ckpt)['budget']['tokens'],
           **exact_match(model, load_problems(paths.eval_file), rt),
           'val_loss_clean': evaluate(model, (val_x,), val_y, cfg.batch_size, rt)}
    atomic_write_bytes(path, json.dumps(out, indent=1).encode())
    return out


def gate(what, value, threshold, fix):
    print(f"gate: {what} {value:.3f}, needs >= {threshold:g}: {'pass' if value >= threshold else 'FAIL'}", flush=True)
    if value < threshold:
        raise UserError(f'gate failed: {what} is {value:.3f}, {threshold - value:.3f} below {threshold:g}: {fix}')


def ensure_caches(cfg, paths, todo):
    """Score each noisy corpus an unfinished run trains on, unless its cache is valid (another reference or
    other data make it stale)."""
    for noise in sorted({run.args['noise'] for run in todo if not run.is_done()}):
        try:
            slm.load_cache(paths, noise, cfg.model_dims()['block_size'])
        except DataError:
            slm.build_cache(dataclasses.replace(cfg, noise=noise), paths)


def check_results(cfg, paths):
    """Before any training: every eval.json the study will read back is readable (a damaged one is
    refused in one line now, not after the reference and the gates)."""
    for path in filter(Path.exists, [Path(arm.run_dir) / 'eval.json' for arm in study_runs(cfg)]):
        read_result(path, ARM_RESULT_KEYS, RESULT_FIX)
    if (paths.ref_ckpt.parent / 'eval.json').exists():
        read_result(paths.ref_ckpt.parent / 'eval.json', REF_KEYS, REF_FIX)


# -----------------------------------------------------------------------------
# stages

def stage_all(cfg, paths):
    """ref (trained, or resumed, unless --ref_ckpt names one) -> gate 1 -> the oracle's first run -> gate 2
    -> every other run -> compare."""
    check_results(cfg, paths)
    if not cfg.ref_ckpt:
        run_plan([reference_run(cfg, paths)], cfg.jobs)
    gate("the reference model's held-out exact match", reference_eval(cfg, paths)['accuracy'], cfg.gate_ref,
         'raise --ref_budget (or the model size) and rerun')
    first, *rest = [arm_run(arm) for arm in study_runs(cfg, file_sha256(paths.ref_ckpt))]
    ensure_caches(cfg, paths, [first])
    run_plan([first], cfg.jobs)
    oracle = read_result(first.out_dir / 'eval.json', ARM_KEYS, RESULT_FIX)
    gate(f"the oracle arm's held-out exact match (seed {oracle['seed']})", oracle['accuracy'], cfg.gate_oracle,
         'raise --budget and rerun')
    ensure_caches(cfg, paths, rest)
    run_plan(rest, cfg.jobs)
    return stage_compare(cfg, paths)


def stage_export(cfg, paths):
    """The static "concentrated" mask: the k fraction of all tokens with the lowest ref_loss
    (select_by='reference', once, globally). Excess-loss selection has no such mask: its train_loss moves."""
    corpus, T = paths.corpus(cfg.noise), runs.load_checkpoint(paths.ref_ckpt)['model_args']['block_size']
    ref_loss = np.asarray(slm.load_cache(paths, cfg.noise, T), dtype=np.float32)
    scored = np.zeros(len(ref_loss), dtype=bool)
    scored[1:num_examples(ref_loss, T) * T + 1] = True
    mask = scored & (ref_loss <= np.quantile(ref_loss[scored], cfg.k))
    path = corpus / f'concentrated_k{round(100 * cfg.k)}.bin'
    atomic_write_bytes(path, mask.astype(np.uint8).tobytes())
    kinds = np.asarray(load_kinds(corpus))
    rates = {name: float(mask[scored & (kinds == i)].mean()) for i, name in enumerate(KINDS) if (scored & (kinds == i)).any()}
    print(f'wrote {path}: {mask.sum():,} of {scored.sum():,} tokens kept; kept rate by kind {rates}')
    return rates


def arm_line_losses(cfg, paths):
    """{model: [line_losses per seed]}: the reference model's and each finished arm's at --noise, from the
    checkpoints that are here (a copy of the logs alone has none)."""
    found = [(path.parent / 'ckpt.pt', read_result(path, ARM_KEYS, RESULT_FIX)['arm'])
             for path in sorted((paths.root / corpus_name(cfg.noise)).glob('*/eval.json')) if (path.parent / 'ckpt.pt').exists()]
    if not found or not (paths.ref_data / 'val.bin').exists():  # no arm here: nothing to read (or write)
        return None
    found = ([(paths.ref_ckpt, 'reference model')] if paths.ref_ckpt.exists() else []) + found
    rt, out, val = runs.setup_device(cfg), {}, {}
    for ckpt, name in found:
        model = runs.load_model(ckpt, rt.device, compile_loss=False)
        T = model.config.block_size  # the study's models share it: the val windows are read once
        val[T] = val.get(T) or clean_val(paths.ref_data, T, cfg.eval_batches * cfg.batch_size)
        out.setdefault(name, []).append(line_losses(model, *val[T], rt))
    return out


def stage_compare(cfg, paths):
    """compare.md (every arm); with the coin control among --arms, control.md too."""
    text = report(paths.root, cfg.noise, cfg.k, arm_line_losses(cfg, paths))
    if CONTROL in cfg.arms.split(','):
        text += '\n\n' + control_report(paths.root, cfg.noise, cfg.k)
    return text


STAGE_FNS = {'all': stage_all, 'compare': stage_compare, 'export': stage_export}


def main(cfg):
    if cfg.stage != 'compare':
        ensure_prepared(cfg.mathmix_dir, sorted({cfg.noise, *(cfg.noise_sweep if cfg.stage == 'all' else ())}))
    return STAGE_FNS[cfg.stage](cfg, slm.get_paths(cfg))


DESIGNS = {'control': ControlConfig}  # python -m studies.slm <design> [--key=value ...]


if __name__ == '__main__':
    cli_designs(main, StudyConfig, DESIGNS)
