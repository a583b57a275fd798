"""Rho-1: Selective Language Modeling (SLM), measured on a task a CPU-size model learns.

Paper: "Rho-1: Not All Tokens Are What You Need" (Lin et al. 2024, arXiv 2404.07965). The algorithm:
  1. train a reference model on a small clean target-domain corpus; ref_loss[i] = its loss on token i;
  2. forward every token of a batch of the large noisy corpus: excess_loss = train_loss - ref_loss;
  3. backpropagate only the top k of the batch's B*T tokens (global top-k; the paper's k = 0.6 for math):
       L_SLM = sum of the selected tokens' losses / number selected        (k = 1: plain causal LM, CLM)
Ablations (select_by): 'reference' (lowest ref_loss), 'train' (highest train_loss), 'random', and
'oracle', which trains on exactly the tokens the data generator labelled clean (no k: an upper bound).
SLM saves no compute: every token is forwarded and the backward runs through the whole network; it
changes which tokens the gradient comes from. Excess-loss selection cannot be precomputed into a static
dataset (train_loss is the current model's); only select_by='reference' can (--stage=export).

The task (data/mathmix), option (a) of issue 18: two-digit addition facts `ab+cd=` with held-out operand
pairs. Not Rho-1's own recipe (b) (a base model that can copy, fine-tuned into the reference, then
continued pre-training): copying never formed at CPU size in 1M tokens, and (b) puts three trainings
before the first arm. The facts are learned from ~0.4M clean tokens (the default reference: 100% held-out
exact match after 0.6M), unseen pairs test generalisation, not recall, and every token's kind is known:
clean, a bad source's wrong digit (the majority answer on "trap" sums), boilerplate inside worksheets,
off-domain prose; so the selection rate per kind and the oracle arm are exact.

The study (a finished stage or run is skipped on a rerun; a killed one resumes): gates first, the
reference's held-out exact match >= --gate_ref, then the oracle arm's first seed >= --gate_oracle (a
failing gate stops with one line); then clm, excess (SLM), reference, train, random, oracle x --seeds at
--noise, then excess at each --k_sweep and clm and excess at each --noise_sweep over --sweep_seeds seeds,
--jobs runs at a time. data/mathmix/report.py: the table, exact match against tokens with 95% CIs, tokens
SLM needs to reach CLM's final exact match, the selection rate per token kind, each model's loss per byte
of a line.

    python slm.py                       # the study: 48 runs of 1M tokens, two at a time (its cost: README)
    python slm.py --quick=True          # a few-minute smoke run (gates printed, not enforced)
    python slm.py --stage=ref|score|train|compare|export [--noise=0.2 --select_by=excess --k=0.6 --seed=1]
"""
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import runs
import train
from configurator import UserError, cli, cli_args, require
from data.loader import (DATA_ROOT, DataError, atomic_write_bytes, file_sha256, get_examples, num_examples, read_meta,
                         read_result)
from data.mathmix.fewshot import clean_val, exact_match, line_losses, load_problems
from data.mathmix.prepare import CLEAN, KINDS, LINE, corpus_name, ensure_prepared, load_kinds
from data.mathmix.report import ARM_KEYS, REF_FIX, REF_KEYS as REF_EVAL_KEYS, RESULT_FIX, read_curve, report
from model import evaluate


# -----------------------------------------------------------------------------
# the selection: a score per token, the global top k, the SLM loss

def selection_score(select_by, train_loss, ref_loss, generator=None):
    """Higher = selected first. train_loss, ref_loss: (B, T), no grad."""
    if select_by == 'excess':
        return train_loss - ref_loss                   # Rho-1's excess loss
    if select_by == 'reference':
        return -ref_loss                               # what the reference finds easy
    if select_by == 'train':
        return train_loss                              # what the model finds hard
    return torch.rand(train_loss.shape, generator=generator).to(train_loss.device)


def top_k_mask(score, k):
    """1.0 on the round(k * B*T) highest scores of the whole batch, else 0.0. The stable sort gives
    tied scores to the earlier token (flat index), so the selection is deterministic. score (B, T)."""
    flat = score.flatten()
    n_keep = max(1, round(k * flat.numel()))
    if n_keep == flat.numel():
        return torch.ones_like(score)
    mask = torch.zeros_like(flat)
    mask[torch.sort(flat, descending=True, stable=True).indices[:n_keep]] = 1.0
    return mask.view_as(score)


def selection_mask(select_by, k, train_loss, ref_loss, kinds, generator=None):
    """The tokens to train on (B, T): the oracle's are the clean ones, every other arm's the top k."""
    if select_by == 'oracle':
        return (kinds == CLEAN).float()
    return top_k_mask(selection_score(select_by, train_loss, ref_loss, generator), k)


def slm_loss(losses, mask):
    """Sum of the selected tokens' losses / number selected (k = 1: the CLM mean)."""
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def stream_positions(ids, T):
    """Stream position of the token each y[b, t] predicts: id + t + 1. ids (B,) -> (B, T) numpy."""
    return np.asarray(ids, dtype=np.int64)[:, None] + 1 + np.arange(T)


# -----------------------------------------------------------------------------
# the objective

class SelectiveLM(train.CausalLM):
    """SLM: forward every token, backpropagate the selected ones, count what gets selected per token
    kind. Its val loss is the clean target-domain val loss; each eval appends the held-out exact match
    to <run>/curve.jsonl (the accuracy-vs-tokens curve)."""

    def __init__(self, cfg, paths, cache=None):
        super().__init__(cfg.batch_size)
        self.cfg, self.paths, self.corpus = cfg, paths, paths.corpus(cfg.noise)
        self.generator = torch.Generator().manual_seed(cfg.seed)            # select_by='random'
        self.counts = torch.zeros(len(KINDS), 2, dtype=torch.float64)      # per kind: seen, selected
        self.curve_step = -1  # step of the last curve point written (-1: none yet, a fresh run starts the file)
        # ref_loss per stream position: the corpus's cache unless one is given, checked here, before the
        # loop reads any data (a stale cache is refused with its fix)
        self.cache = cache
        if cache is None and cfg.ref_mode == 'cached':
            self.cache = load_cache(self.corpus, paths.ref_ckpt, cfg.model_dims()['block_size'])

    def setup(self, ctx):
        T, self.rt = ctx.model.config.block_size, ctx.rt
        self.counts = self.counts.to(ctx.device)
        self.kinds = load_kinds(self.corpus)
        if self.cfg.ref_mode == 'online':
            self.ref_model = runs.load_model(self.paths.ref_ckpt, ctx.device, self.cfg.compile_loss)
        self.val_x, self.val_y = clean_val(self.paths.ref_data, T, self.cfg.eval_batches * self.cfg.batch_size)
        self.problems = load_problems(self.paths.eval_file)
        self.curve = ctx.out_dir / 'curve.jsonl' if ctx.rt.master else None

    def reference_losses(self, x, y, ids, ctx):
        if self.cfg.ref_mode == 'cached':  # costs no reference forward
            return torch.from_numpy(self.cache[stream_positions(ids, x.size(1))].astype(np.float32)).to(x.device)
        with torch.no_grad():
            ref = self.ref_model(x, y)
        ctx.charge_forward(len(x), self.ref_model.n_layer)
        return ref

    def __call__(self, model, data, ctx):
        x, y, ids = data.next(self.batch_size)
        losses = model(x, y)                                            # (B, T) train_loss
        ref_loss = self.reference_losses(x, y, ids, ctx)                # (B, T)
        kinds = torch.from_numpy(self.kinds[stream_positions(ids, x.size(1))].astype(np.int64)).to(x.device)
        mask = selection_mask(self.cfg.select_by, self.cfg.k, losses.detach(), ref_loss, kinds, self.generator)
        seen = torch.bincount(kinds.flatten(), minlength=len(KINDS)).double()   # per kind: tokens seen, selected
        kept = torch.bincount(kinds.flatten(), weights=mask.flatten().double(), minlength=len(KINDS))
        self.counts += torch.stack([seen, kept], 1)
        logs = {'selected_frac': mask.mean(), 'excess_selected': slm_loss(losses.detach() - ref_loss, mask)}
        return train.Step(slm_loss(losses, mask), len(x), logs)

    def selection_rates(self):
        """Fraction of each kind's tokens selected since the run began (kinds never seen are left out)."""
        c = self.counts.cpu()
        return {name: float(c[i, 1] / c[i, 0]) for i, name in enumerate(KINDS) if c[i, 0] > 0}

    def evaluate(self, model, ctx):
        val = ctx.evaluate(model, (self.val_x,), self.val_y)
        if self.curve is not None:
            point = {'step': ctx.step, 'tokens': ctx.spent['tokens'], 'val_loss_clean': val,
                     **exact_match(model, self.problems, self.rt), 'selection': self.selection_rates()}
            with open(self.curve, 'a' if self.curve_step >= 0 else 'w') as f:
                f.write(json.dumps(point) + '\n')
        self.curve_step = ctx.step
        return val

    def state_dict(self):  # the loop checkpoints right after an eval: 'step' is that eval's curve point
        return {'generator': self.generator.get_state(), 'counts': self.counts.cpu(), 'step': self.curve_step}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])
        self.counts = state['counts'].to(self.counts.device)
        self.curve_step = state['step']
        if self.curve is not None:
            runs.trim_log(self.curve, self.curve_step)  # drop points written after the checkpoint


# -----------------------------------------------------------------------------
# the reference losses: the cache and its sidecar

def cache_identity(corpus, ref_ckpt, block_size):
    """What a valid cache must agree with: the reference checkpoint, the token stream, tokenizer, shape."""
    if not ref_ckpt.exists():
        raise DataError(f'no reference model at {ref_ckpt}: run `python slm.py --stage=ref` first')
    meta = read_meta(corpus)
    return {'ref_ckpt_sha256': file_sha256(ref_ckpt), 'data_sha256': file_sha256(corpus / 'train.bin'),
            'tokenizer': meta['tokenizer'], 'block_size': block_size, 'n_tokens': meta['counts']['train']['tokens']}


@torch.no_grad()
def score_stream(model, tokens, rt, batch_size=64):
    """ref_loss of every token the aligned examples predict (positions 1..n*T; the rest stay 0)."""
    T, n = model.config.block_size, num_examples(tokens, model.config.block_size)
    out = np.zeros(len(tokens), dtype=np.float16)
    for start in range(0, n, batch_size):
        ids = np.arange(start, min(start + batch_size, n)) * T
        x, y = get_examples(tokens, ids, T)
        with rt.autocast():
            out[stream_positions(ids, T)] = model(x.to(rt.device), y.to(rt.device)).float().cpu().numpy()
    return out


def build_cache(cfg, paths):
    """Stage score: one no-grad pass of the reference model over --noise's corpus; the sidecar last."""
    corpus, rt = paths.corpus(cfg.noise), runs.setup_device(cfg)
    model = runs.load_model(paths.ref_ckpt, rt.device, cfg.compile_loss)
    ref_loss = score_stream(model, np.memmap(corpus / 'train.bin', dtype=np.uint16, mode='r'), rt)
    (corpus / 'ref_loss.json').unlink(missing_ok=True)  # invalid until the sidecar is back
    atomic_write_bytes(corpus / 'ref_loss.bin', ref_loss.tobytes())
    kinds = np.asarray(load_kinds(corpus))
    by_kind = {name: float(ref_loss[1:][kinds[1:] == i].astype(np.float64).mean())
               for i, name in enumerate(KINDS) if (kinds[1:] == i).any()}
    side = {**cache_identity(corpus, paths.ref_ckpt, model.config.block_size), 'ref_ckpt': str(paths.ref_ckpt),
            'dtype': 'float16', 'mean_ref_loss': by_kind}
    atomic_write_bytes(corpus / 'ref_loss.json', json.dumps(side, indent=1).encode())
    print(f"wrote {corpus / 'ref_loss.bin'}: mean ref_loss by kind " + ', '.join(f'{k} {v:.3f}' for k, v in by_kind.items()))


def load_cache(corpus, ref_ckpt, block_size):
    """The ref_loss memmap, or DataError (one line) if it is missing, unreadable, truncated or stale."""
    side_path, rebuild = corpus / 'ref_loss.json', 'rebuild it with `python slm.py --stage=score`, or use --ref_mode=online'
    if not side_path.exists():
        raise DataError(f'no reference-loss cache in {corpus}: run `python slm.py --stage=score`')
    side = read_result(side_path, {'dtype': str}, rebuild)  # a sidecar; one without the identity's keys is stale
    want = cache_identity(corpus, ref_ckpt, block_size)
    stale = [k for k, v in want.items() if side.get(k) != v]
    if stale:
        raise DataError(f"stale reference-loss cache {side_path} ({', '.join(stale)} changed or missing): {rebuild}")
    size = (corpus / 'ref_loss.bin').stat().st_size if (corpus / 'ref_loss.bin').exists() else 0
    if size != 2 * want['n_tokens']:
        raise DataError(f"reference-loss cache {corpus / 'ref_loss.bin'} holds {size} bytes, not "
                        f"{2 * want['n_tokens']} (float16 per token): it is truncated; {rebuild}")
    return np.memmap(corpus / 'ref_loss.bin', dtype=np.float16, mode='r')


# -----------------------------------------------------------------------------
# config: which stage reads which key

SELECT_BY = ('excess', 'reference', 'train', 'random', 'oracle')
ARMS = ('clm',) + SELECT_BY
STAGES = ('all', 'ref', 'score', 'train', 'compare', 'export')
# TrainConfig keys the reference run reads too (with ref_budget, ref_ckpt); for the rest of the recipe
# (optimizer, schedule, arch, ...) it keeps TrainConfig's defaults: TRAIN_KEYS are the arms' only.
REF_KEYS = ('model', 'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'dropout', 'seed', 'init_from', 'overwrite',
            'batch_size', 'budget_unit', 'rst_table', 'eval_interval', 'eval_batches', 'log_interval',
            'sample_tokens', 'device', 'dtype', 'compile', 'compile_loss', 'peak_flops')
NOT_REF = ('out_dir', 'dataset', 'tokenizer', 'model_type', 'budget')  # the pipeline's, and the arms' budget
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(train.TrainConfig) if f.name not in REF_KEYS + NOT_REF)
STUDY_KEYS = ('arms', 'seeds', 'sweep_seeds', 'noise_sweep', 'k_sweep', 'gate_ref', 'gate_oracle', 'jobs')  # a run keeps their defaults


def default(name, value):
    """TrainConfig's key `name` with slm.py's default, and the valid range TrainConfig declares for it."""
    return dataclasses.field(default=value, metadata=train.TrainConfig.__dataclass_fields__[name].metadata)


@dataclass(frozen=True)
class SLMConfig(train.TrainConfig):
    """Each key's comment starts with the stages that read it. Of TrainConfig's keys, REF_KEYS are read by
    every stage that trains or loads a model, TRAIN_KEYS (lr, optimizer, schedule, arch, ...) only by the
    stages that train arms (all, train; any other refuses them); --dataset is --mathmix_dir's."""
    QUICK: ClassVar[dict] = dict(budget=1e5, ref_budget=1.5e5, eval_interval=40, seeds=2, arms='clm,excess,oracle',
                                 noise_sweep=(), k_sweep=(), gate_ref=0.0, gate_oracle=0.0)
    out_dir: str = default('out_dir', 'out/slm')  # every stage: ref/, noise<P>/<arm>_s<seed>/, compare.md, curves
    n_layer: int = default('n_layer', 2)  # ref, train: 2 blocks of width 128 learn the facts in ~0.4M clean tokens
    n_head: int = default('n_head', 4)  # ref, train
    n_embd: int = default('n_embd', 128)  # ref, train
    block_size: int = default('block_size', 72)  # ref, train: a multiple of 9 (mathmix's line): 8 lines per window
    batch_size: int = default('batch_size', 8)  # ref, train: the facts formed sooner than at 16 (measured)
    budget_unit: str = default('budget_unit', 'tokens')  # ref, train: arms are compared at equal training tokens
    budget: float = default('budget', 1e6)  # train: tokens per arm (the reference's: ref_budget; other stages ignore it)
    eval_interval: int = default('eval_interval', 80)  # ref, train: steps between accuracy-curve points (46k tokens)
    eval_batches: int = default('eval_batches', 8)  # ref, train: the clean val set: eval_batches x batch_size examples
    sample_tokens: int = default('sample_tokens', 0)  # ref, train
    stage: str = 'all'              # all (the study: ref, gates, runs, compare) or one of STAGES
    quick: bool = False             # every stage: QUICK's values for the keys not given
    k: float = 0.6                  # train, export: fraction of the batch's tokens trained on (paper: 0.6 math)
    select_by: str = 'excess'       # train: excess (Rho-1), reference (low ref_loss), train (high loss), random, oracle
    noise: float = 0.2              # all (the arms' comparison), score, train, export: which noisy corpus
    noise_sweep: tuple = (0.0, 0.4)  # all: further noise levels, each with clm and excess at --k
    k_sweep: tuple = (0.4, 0.8)     # all: further k for excess at --noise
    arms: str = ','.join(ARMS)      # all: the arms compared at --noise (the oracle always runs first: a gate)
    seeds: int = 5                  # all: seed, seed+1, ... for the arms at --noise
    sweep_seeds: int = 3            # all: the k and noise sweeps run the first sweep_seeds of the seeds
    jobs: int = 2                   # all: runs at once after the gates, the CPU threads split between them
    gate_ref: float = 0.8           # all: the reference's held-out exact match must reach this
    gate_oracle: float = 0.5        # all: and the oracle arm's (first seed)
    ref_mode: str = 'cached'        # train: cached (ref_loss.bin, stage score) or online (a reference forward per step)
    ref_budget: float = 2e6         # ref: the reference model's budget (budget_unit), on the clean corpus
    ref_lr: float = 3e-3            # ref: its peak lr (the arms': --lr, 2e-3: at 3e-3 SLM's first seed never learned)
    ref_ckpt: str = ''              # ref (writes its folder), score, train, export: '' = <out_dir>/ref/ckpt.pt
    mathmix_dir: str = ''           # every stage but compare: '' = data/mathmix (prepared on first use)

    def __post_init__(self):
        super().__post_init__()
        require(self.stage in STAGES, f"--stage must be one of {', '.join(STAGES)}, got '{self.stage}'")
        require(0 < self.k <= 1, f'--k must be in (0, 1], got {self.k}')
        require(all(0 < k <= 1 for k in self.k_sweep), f'--k_sweep must be fractions in (0, 1], got {self.k_sweep}')
        require(all(0 <= f < 1 for f in (self.noise, *self.noise_sweep)), '--noise and --noise_sweep must be in [0, 1)')
        require(self.select_by in SELECT_BY, f"--select_by must be one of {', '.join(SELECT_BY)}")
        require(self.ref_mode in ('cached', 'online'), "--ref_mode must be 'cached' or 'online'")
        require(self.tokenizer == 'byte', "--tokenizer must be 'byte' (mathmix is byte-level)")
        require(self.model_type == 'gpt', '--model_type must be gpt (SLM selects next-token losses)')
        require(not self.branch_budgets, '--branch_budgets: slm.py runs no WSD branches')
        require(set(self.arms.split(',')) <= set(ARMS), f"--arms: a comma list of {', '.join(ARMS)}")
        require(min(self.seeds, self.sweep_seeds, self.jobs, self.ref_budget, self.ref_lr) > 0,
                '--seeds, --sweep_seeds, --jobs, --ref_budget and --ref_lr must be > 0')
        require(all(0 <= g <= 1 for g in (self.gate_ref, self.gate_oracle)), '--gate_ref, --gate_oracle must be in [0, 1]')
        for name in ('ref_ckpt', 'mathmix_dir'):  # '' is the default; ' ' would name a stray file or folder
            require(getattr(self, name) == '' or getattr(self, name).strip() != '', f"--{name} is blank: give a path, or ''")
        require(not (self.ref_ckpt and Path(self.ref_ckpt).is_dir()),
                f'--ref_ckpt={self.ref_ckpt} is a folder: give the checkpoint file (e.g. {Path(self.ref_ckpt) / "ckpt.pt"})')
        T = self.model_dims()['block_size']
        require(T % LINE == 0 and T >= 2 * LINE, f'--block_size must be a multiple of {LINE} (a mathmix line), >= {2 * LINE}')
        base = {f.name: f.default for f in dataclasses.fields(self)} | (self.QUICK if self.quick else {})
        stray = [f'--{key}' for key in TRAIN_KEYS if getattr(self, key) != base[key]]
        require(self.stage in ('all', 'train') or not stray,
                f"{', '.join(stray)}: read only by the stages that train arms (all, train), not --stage={self.stage}")


def arm_spec(arm, k):
    """(select_by, k) of an arm: clm trains on every token, the oracle on the clean ones."""
    return {'clm': ('excess', 1.0), 'oracle': ('oracle', 1.0)}.get(arm, (arm, k))


def arm_name(select_by, k):
    return 'oracle' if select_by == 'oracle' else 'clm' if k == 1 else f'{select_by}_k{round(100 * k)}'


def study_runs(cfg):
    """Every run of the study in order: the oracle's first seed (a gate), the arms at --noise seed by
    seed, then the k sweep, then the noise sweep (an interrupted study has whole comparisons first)."""
    groups = [[(cfg.noise, 'oracle', 1.0)] + [(cfg.noise, *arm_spec(a, cfg.k)) for a in cfg.arms.split(',')],
              [(cfg.noise, 'excess', k) for k in cfg.k_sweep],
              [(f, *arm_spec(a, cfg.k)) for f in cfg.noise_sweep for a in ('clm', 'excess')]]
    cells = [(noise, select_by, k, seed) for group, n_seeds in zip(groups, (cfg.seeds, *2 * [min(cfg.seeds, cfg.sweep_seeds)]))
             for seed in range(cfg.seed, cfg.seed + n_seeds) for noise, select_by, k in group]
    return [dataclasses.replace(cfg, noise=n, select_by=s, k=k, seed=seed) for n, s, k, seed in dict.fromkeys(cells)]


@dataclass(frozen=True)
class Paths:
    root: Path        # out_dir: ref/, noise<P>/<arm>_s<seed>/, compare.md, compare_curves.png
    ref_ckpt: Path
    data: Path        # mathmix: ref/byte, noise<P>/byte, eval/eval.jsonl
    ref_data: Path    # the clean corpus (its val split: clean target-domain val text)
    eval_file: Path   # the held-out problems

    def corpus(self, noise):  # train.bin, kinds.bin, ref_loss.bin, ref_loss.json
        return self.data / corpus_name(noise) / 'byte'

    def run_dir(self, cfg):
        return self.root / corpus_name(cfg.noise) / f'{arm_name(cfg.select_by, cfg.k)}_s{cfg.seed}'


def get_paths(cfg):
    root, data = Path(cfg.out_dir), Path(cfg.mathmix_dir) if cfg.mathmix_dir else DATA_ROOT / 'mathmix'
    return Paths(root, Path(cfg.ref_ckpt) if cfg.ref_ckpt else root / 'ref' / 'ckpt.pt', data, data / 'ref' / 'byte',
                 data / 'eval' / 'eval.jsonl')


# -----------------------------------------------------------------------------
# stages

def ref_config(cfg, paths):
    """The reference run: plain causal LM on the clean corpus (REF_KEYS, ref_*), with the shared loop."""
    return train.TrainConfig(**{key: getattr(cfg, key) for key in REF_KEYS}, budget=cfg.ref_budget, lr=cfg.ref_lr,
                             out_dir=str(paths.ref_ckpt.parent), dataset=str(paths.ref_data))


def stage_ref(cfg, paths):
    return train.train(ref_config(cfg, paths))


def ref_state(cfg, paths):
    """'finished', 'killed' (resume it) or 'other' (none, or one trained with other keys: train it anew)."""
    folder = paths.ref_ckpt.parent
    same = runs.records_config(folder, dataclasses.asdict(ref_config(cfg, paths)))
    return 'other' if not (same and paths.ref_ckpt.exists()) else 'finished' if runs.run_finished(folder) else 'killed'


def reference_eval(cfg, paths):
    """The reference model's held-out exact match and clean val loss, measured once per checkpoint."""
    path, sha = paths.ref_ckpt.parent / 'eval.json', file_sha256(paths.ref_ckpt)
    saved = read_result(path, REF_EVAL_KEYS, REF_FIX) if path.exists() else {}
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
    print(f"gate: {what} {value:.3f}, needs >= {threshold:g}: {'pass' if value >= threshold else 'FAIL'}")
    if value < threshold:
        raise UserError(f'gate failed: {what} is {value:.3f}, {threshold - value:.3f} below {threshold:g}: {fix}')


def alone(cfg):
    """The arm as `--stage=train` runs it: the study's keys at their defaults, --quick's values written out."""
    return dataclasses.replace(cfg, **{key: getattr(SLMConfig, key) for key in STUDY_KEYS}, stage='train', quick=False)


def arm_config(cfg, paths):
    """The arm's run config and what its eval.json records it as: the run config and the reference's checksum."""
    if not paths.ref_ckpt.exists():
        raise DataError(f'no reference model at {paths.ref_ckpt}: run `python slm.py --stage=ref` first')
    run = dataclasses.replace(alone(cfg), out_dir=str(paths.run_dir(cfg)), dataset=str(paths.corpus(cfg.noise)),
                              init_from='scratch', overwrite=True)
    return run, json.loads(json.dumps({**dataclasses.asdict(run), 'ref_ckpt_sha256': file_sha256(paths.ref_ckpt)}))


ARM_RESULT_KEYS = {**ARM_KEYS, 'run_config': dict}  # what finished_arm reads back


def finished_arm(cfg, paths):
    """The arm's eval.json if it finished as cfg asks now, with this reference; else None."""
    path = paths.run_dir(cfg) / 'eval.json'
    if cfg.overwrite or not path.exists():
        return None
    result = read_result(path, ARM_RESULT_KEYS, RESULT_FIX)
    return result if result['run_config'] == arm_config(cfg, paths)[1] else None


def run_arm(cfg, paths):
    """One run of cfg's arm, noise and seed into its folder (a killed run resumes, a finished one is
    skipped) -> its eval.json: the final curve point, i.e. the eval at the end of the budget. The run's
    config leaves out the study's keys, so a study rerun with more seeds or arms resumes it."""
    done = finished_arm(cfg, paths)
    if done:
        return done
    run, same = arm_config(cfg, paths)
    folder = paths.run_dir(cfg)
    resume = (folder / 'ckpt.pt').exists() and not (folder / 'eval.json').exists() and not cfg.overwrite
    run = dataclasses.replace(run, init_from='resume' if resume else 'scratch', overwrite=not resume)
    if train.train(run, SelectiveLM(run, paths))['interrupted']:
        raise KeyboardInterrupt  # stop the study here; the same command resumes this run
    final = read_curve(folder / 'curve.jsonl')[-1]
    out = {'run': f'{folder.parent.name}/{folder.name}', 'noise': cfg.noise, 'arm': arm_name(cfg.select_by, cfg.k),
           'k': cfg.k, 'seed': cfg.seed, **final, 'run_config': same}
    atomic_write_bytes(folder / 'eval.json', json.dumps(out, indent=1).encode())
    print(f"{out['run']}: exact match {out['accuracy']:.3f} (trap {out['trap_accuracy']:.3f}), "
          f"clean val loss {out['val_loss_clean']:.4f}, selected {out['selection']}")
    return out


def ensure_cache(cfg, paths):
    """Score cfg's corpus with the reference unless a valid cache is there (another reference or other
    data make it stale)."""
    try:
        load_cache(paths.corpus(cfg.noise), paths.ref_ckpt, cfg.model_dims()['block_size'])
    except DataError:
        build_cache(cfg, paths)


def check_results(cfg, paths):
    """Before any training: every eval.json the study will read back is readable (a damaged one is
    refused in one line now, not after the reference and the gates)."""
    found = [paths.run_dir(run) / 'eval.json' for run in study_runs(cfg) if not cfg.overwrite]
    for path in filter(Path.exists, found):
        read_result(path, ARM_RESULT_KEYS, RESULT_FIX)
    if (paths.ref_ckpt.parent / 'eval.json').exists():
        read_result(paths.ref_ckpt.parent / 'eval.json', REF_EVAL_KEYS, REF_FIX)


def stage_all(cfg, paths):
    """ref (trained, or resumed, unless --ref_ckpt names one) -> gate 1 -> the oracle's first run -> gate 2
    -> every other run -> compare."""
    check_results(cfg, paths)
    state = 'given' if cfg.ref_ckpt else 'other' if cfg.overwrite else ref_state(cfg, paths)
    if state in ('killed', 'other'):  # a killed reference resumes; the same command resumes after Ctrl-C
        resume = state == 'killed'
        if stage_ref(dataclasses.replace(cfg, init_from='resume' if resume else 'scratch', overwrite=not resume), paths)['interrupted']:
            raise KeyboardInterrupt
    gate("the reference model's held-out exact match", reference_eval(cfg, paths)['accuracy'], cfg.gate_ref,
         'raise --ref_budget (or the model size) and rerun')
    first, *rest = study_runs(cfg)
    ensure_cache(first, paths)
    gate(f"the oracle arm's held-out exact match (seed {first.seed})", run_arm(first, paths)['accuracy'],
         cfg.gate_oracle, 'raise --budget and rerun')
    rest = [run for run in rest if not finished_arm(run, paths)]
    for noise in sorted({run.noise for run in rest}):
        ensure_cache(next(run for run in rest if run.noise == noise), paths)
    if cfg.jobs == 1:
        for run in rest:
            run_arm(run, paths)
    else:  # each run its own process, as `--stage=train` would run it alone
        failed = runs.run_jobs([runs.Job(str(paths.run_dir(run)), [sys.executable, __file__, *cli_args(alone(run))],
                                         paths.run_dir(run).with_suffix('.out')) for run in rest], cfg.jobs)
        if failed:
            job, last = failed[0]
            raise UserError(f'{len(failed)} run(s) failed, first: {job.label}: {last} (see {job.log})')
    return stage_compare(cfg, paths)


def stage_export(cfg, paths):
    """The static "concentrated" mask: the k fraction of all tokens with the lowest ref_loss
    (select_by='reference', once, globally). Excess-loss selection has no such mask: see the top."""
    corpus, T = paths.corpus(cfg.noise), runs.load_checkpoint(paths.ref_ckpt)['model_args']['block_size']
    ref_loss = np.asarray(load_cache(corpus, paths.ref_ckpt, T), dtype=np.float32)
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
    return report(paths.root, cfg.noise, cfg.k, arm_line_losses(cfg, paths))


STAGE_FNS = {'all': stage_all, 'ref': stage_ref, 'score': build_cache, 'train': run_arm, 'export': stage_export,
             'compare': stage_compare}


def main(cfg):
    if cfg.stage != 'compare':
        ensure_prepared(cfg.mathmix_dir, sorted({cfg.noise, *(cfg.noise_sweep if cfg.stage == 'all' else ())}))
    return STAGE_FNS[cfg.stage](cfg, get_paths(cfg))


if __name__ == '__main__':
    cli(main, SLMConfig)
