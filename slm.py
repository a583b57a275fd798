"""Rho-1: Selective Language Modeling (SLM), on a math target task with cached reference losses.

Paper: "Rho-1: Not All Tokens Are What You Need" (Lin et al. 2024, arXiv 2404.07965). The idea:
  1. train a reference model on a small clean target-domain corpus; ref_loss[i] = its loss on token i;
  2. forward every token of a batch of the large noisy corpus: excess_loss = train_loss - ref_loss;
  3. backpropagate only the top k of the batch's B*T tokens (global top-k; k = 0.6 for math):
     loss = sum of the selected tokens' losses / number selected. k = 1 is plain causal LM (CLM).
Ablations (select_by): 'reference' (lowest ref_loss), 'train' (highest train_loss), 'random'.

ref_loss is computed once (stage score) into ref_loss.bin beside train.bin: float16, entry id+t+1 is the
loss of y[t] in the example at id (the token stream's position of the predicted token), with a sidecar
ref_loss.json (reference checkpoint hash, data hash, tokenizer, block size): a stale cache is refused.
ref_mode=online runs the reference forward each step instead, charged as a forward-only pass.
Only select_by='reference' can be exported as a static "concentrated" dataset (stage export): ref_loss
never changes. Excess-loss selection cannot be static: train_loss is the *current* model's loss, so a
token leaves the selection once it is learned (and may come back if forgotten); every step needs the
trained model's forward on every token. So SLM saves no forward compute and the backward still runs
through the whole network: it changes which tokens the gradient comes from, not what a step costs.
The task (data/mathmix): prepare.py writes the corpora and held-out problems, fewshot.py scores them.

    python slm.py --quick=True          # ref, score, CLM and SLM, eval, compare: ~3 minutes on a CPU
    python slm.py                       # 5 arms (clm, excess, reference, train, random) x 3 seeds, ~25 min
    python slm.py --stage=ref|score|train|eval|compare|export|timing [--k=0.6 --select_by=excess --seed=1]
(On a busy CPU, OMP_NUM_THREADS=1 runs these small models several times faster.)
"""
import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import train
from budget import t_interval
from configurator import cli, require
from data.loader import (DATA_ROOT, DataError, atomic_write_bytes, file_sha256, get_examples, num_examples)
from data.mathmix.fewshot import clean_val, few_shot_eval, load_problems
from data.mathmix.prepare import FAMILIES, NOISE_KINDS, PrepareConfig, prepare


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


def slm_loss(losses, mask):
    """Sum of the selected tokens' losses / number selected (k = 1: the CLM mean)."""
    return (losses * mask).sum() / mask.sum()


def stream_positions(ids, T):
    """Stream position of the token each y[b, t] predicts: id + t + 1. ids (B,) -> (B, T) numpy."""
    return np.asarray(ids, dtype=np.int64)[:, None] + 1 + np.arange(T)


# -----------------------------------------------------------------------------
# the objective

class SelectiveLM(train.CausalLM):
    """SLM: forward every token, backpropagate the top k by select_by; log what gets selected. Its
    val_loss is the clean target-domain val loss; each eval adds a point to <run>/curve.jsonl."""

    def __init__(self, cfg, paths):
        super().__init__(cfg.batch_size)
        self.cfg, self.paths, self.k, self.select_by = cfg, paths, cfg.k, cfg.select_by
        self.generator = torch.Generator().manual_seed(cfg.seed)             # select_by='random'
        self.counts = torch.zeros(len(NOISE_KINDS), 2, dtype=torch.float64)  # per noise kind: seen, selected
        self.curve_step = -1  # step of the last curve point written (-1: none yet, a fresh run starts the file)

    def setup(self, ctx):
        T = ctx.model.config.block_size
        self.counts = self.counts.to(ctx.device)
        self.noise = np.memmap(self.paths.train_data / 'noise.bin', dtype=np.uint8, mode='r')
        if self.cfg.ref_mode == 'cached':
            self.cache = load_cache(self.paths, T)
        else:
            self.ref_model = train.load_model(self.paths.ref_ckpt, ctx.device, self.cfg.compile_loss)
        self.val_x, self.val_y = clean_val(self.paths.ref_data, T, self.cfg.eval_batches * self.cfg.batch_size)
        self.problems = load_problems(self.paths.eval_file, self.cfg.curve_problems)
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
        mask = top_k_mask(selection_score(self.select_by, losses.detach(), ref_loss, self.generator), self.k)
        return train.Step(slm_loss(losses, mask), len(x), self.selection_logs(losses.detach() - ref_loss, mask, ids))

    def selection_logs(self, excess_loss, mask, ids):
        logs = {'selected_frac': mask.mean(), 'excess_selected': slm_loss(excess_loss, mask)}
        if self.k < 1:
            logs['excess_unselected'] = slm_loss(excess_loss, 1 - mask)
        if self.noise is not None:  # the generator knows which tokens are noise: how often each kind is kept
            kinds = torch.from_numpy(self.noise[stream_positions(ids, mask.size(1))].astype(np.int64)).to(mask.device)
            seen = torch.bincount(kinds.flatten(), minlength=len(NOISE_KINDS)).double()
            kept = torch.bincount(kinds.flatten(), weights=mask.flatten().double(), minlength=len(NOISE_KINDS))
            self.counts += torch.stack([seen, kept], 1)
            logs['sel_clean'] = kept[0] / seen[0].clamp(min=1)
            logs['sel_noise'] = kept[1:].sum() / seen[1:].sum().clamp(min=1)
        return logs

    def selection_rates(self):
        """Selection rate per noise kind (and all noise) since the run began."""
        c = self.counts.cpu()
        rates = {name: float(c[i, 1] / c[i, 0]) for i, name in enumerate(NOISE_KINDS) if c[i, 0] > 0}
        return rates | ({'all_noise': float(c[1:, 1].sum() / c[1:, 0].sum())} if c[1:, 0].sum() > 0 else {})

    def evaluate(self, model, ctx):
        val = ctx.evaluate(model, (self.val_x,), self.val_y)
        if self.curve is not None:
            point = {'step': ctx.step, 'tokens': ctx.spent['tokens'], 'val_loss_clean': val,
                     'selection': self.selection_rates()}
            if self.problems:
                point.update(few_shot_eval(model, self.problems, ctx.rt, self.cfg.max_new_tokens)[0])
            with open(self.curve, 'a' if self.curve_step >= 0 else 'w') as f:
                f.write(json.dumps(point) + '\n')
        self.curve_step = ctx.step
        return val

    def state_dict(self):  # the loop checkpoints right after an eval: 'step' is that eval's curve point
        return {'generator': self.generator.get_state(), 'counts': self.counts.cpu(), 'step': self.curve_step,
                'selection': self.selection_rates()}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])
        self.counts = state['counts'].to(self.counts.device)
        self.curve_step = state['step']
        if self.curve is not None:
            train.trim_log(self.curve, self.curve_step)  # drop points written after the checkpoint


# -----------------------------------------------------------------------------
# reference losses: the cache and its sidecar

def cache_identity(paths, block_size):
    """What a valid cache must agree with: the reference checkpoint, the token stream, tokenizer, shape."""
    if not paths.ref_ckpt.exists():
        raise DataError(f'no reference model at {paths.ref_ckpt}: run `python slm.py --stage=ref` first')
    meta = json.loads((paths.train_data / 'meta.json').read_text())
    return {'ref_ckpt_sha256': file_sha256(paths.ref_ckpt), 'data_sha256': file_sha256(paths.train_data / 'train.bin'),
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
    """Stage score: one no-grad pass of the reference model; ref_loss.bin first, the sidecar last."""
    rt = train.setup_device(cfg)
    model = train.load_model(paths.ref_ckpt, rt.device, cfg.compile_loss)
    ref_loss = score_stream(model, np.memmap(paths.train_data / 'train.bin', dtype=np.uint16, mode='r'), rt)
    (paths.train_data / 'ref_loss.json').unlink(missing_ok=True)  # invalid until the sidecar is back
    atomic_write_bytes(paths.train_data / 'ref_loss.bin', ref_loss.tobytes())
    kinds = np.fromfile(paths.train_data / 'noise.bin', dtype=np.uint8)
    by_kind = {name: float(ref_loss[1:][kinds[1:] == i].astype(np.float64).mean())
               for i, name in enumerate(NOISE_KINDS) if (kinds[1:] == i).any()}
    side = {**cache_identity(paths, model.config.block_size), 'ref_ckpt': str(paths.ref_ckpt), 'dtype': 'float16',
            'mean_ref_loss': by_kind}
    atomic_write_bytes(paths.train_data / 'ref_loss.json', json.dumps(side, indent=1).encode())
    print(f"wrote {paths.train_data / 'ref_loss.bin'}: mean ref_loss by kind " +
          ', '.join(f'{k} {v:.3f}' for k, v in by_kind.items()))


def load_cache(paths, block_size):
    """The ref_loss memmap, or DataError if it is missing or stale (other model, data, tokenizer, shape)."""
    side_path = paths.train_data / 'ref_loss.json'
    if not side_path.exists():
        raise DataError(f'no reference-loss cache in {paths.train_data}: run `python slm.py --stage=score`')
    side, want = json.loads(side_path.read_text()), cache_identity(paths, block_size)
    stale = [k for k, v in want.items() if side.get(k) != v]
    if stale:
        raise DataError(f"stale reference-loss cache {side_path} ({', '.join(stale)} changed): rebuild it "
                        f'with `python slm.py --stage=score`, or use --ref_mode=online')
    return np.memmap(paths.train_data / 'ref_loss.bin', dtype=np.float16, mode='r')


# -----------------------------------------------------------------------------
# config: which stage reads which key

SELECT_BY = ('excess', 'reference', 'train', 'random')
STAGES = ('all', 'ref', 'score', 'train', 'eval', 'compare', 'export', 'timing')
ALL_ARMS = 'clm,excess,reference,train,random'
# TrainConfig keys the reference run reads too (with ref_budget, ref_ckpt); it trains with TrainConfig's
# defaults for the training recipe (optimizer, lr, schedule, arch, ...): TRAIN_KEYS are the arms' only.
REF_KEYS = ('model', 'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'dropout', 'seed', 'init_from', 'overwrite',
            'batch_size', 'budget_unit', 'rst_table', 'eval_interval', 'eval_batches', 'log_interval',
            'sample_tokens', 'device', 'dtype', 'compile', 'compile_loss', 'peak_flops')
NOT_REF = ('out_dir', 'dataset', 'tokenizer', 'model_type', 'budget')  # the pipeline's, and the arms' budget
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(train.TrainConfig) if f.name not in REF_KEYS + NOT_REF)


@dataclass(frozen=True)
class SLMConfig(train.TrainConfig):
    """Each key's comment starts with the stages that read it. Of TrainConfig's keys, REF_KEYS are read
    by every stage that trains or loads a model, TRAIN_KEYS (optimizer, lr, schedule, arch, ...) only by
    the stages that train arms (all, train, timing; any other stage refuses them), and --dataset is not
    read: the data is --mathmix_dir's."""
    QUICK: ClassVar[dict] = dict(budget=4e5, ref_budget=4e5, eval_interval=25, curve_problems=10, n_embd=96, n_head=2,
                                 batch_size=16, timing_iters=20, seeds=1, arms='clm,excess')
    out_dir: str = 'out/slm'        # every stage: the root: ref/, <arm>_s<seed>/ runs, compare.md, compare_accuracy.png
    n_layer: int = 2                # ref, train: the small preset at 2 blocks: the CPU pipeline in ~25 minutes
    block_size: int = 256           # ref, train: room for a few-shot prompt
    batch_size: int = 8             # ref, train, eval (the eval's clean val set: eval_batches x batch_size)
    budget_unit: str = 'tokens'     # ref, train: arms are compared at equal training tokens
    budget: float = 1e6             # train: training tokens per arm (the reference's: ref_budget; other stages ignore it)
    eval_interval: int = 100        # ref, train
    sample_tokens: int = 0          # ref, train
    stage: str = 'all'              # all (ref, eval it, score, train + eval each arm x seed, compare) or one of STAGES
    quick: bool = False             # every stage: QUICK's values for the keys not given
    k: float = 0.6                  # train, eval, export: fraction of the batch's tokens trained on (paper: 0.6 math)
    select_by: str = 'excess'       # train, eval: excess (Rho-1), reference (low ref_loss), train (high loss), random
    ref_mode: str = 'cached'        # train: cached (ref_loss.bin, stage score) or online (a reference forward per step)
    ref_budget: float = 2e6         # ref: the reference model's budget (budget_unit), on the clean corpus
    ref_ckpt: str = ''              # ref (writes its folder), score, train, export: '' = <out_dir>/ref/ckpt.pt
    mathmix_dir: str = ''           # every stage but compare: '' = data/mathmix (prepared on first use)
    arms: str = ALL_ARMS            # all: a comma list: clm (k = 1) or a select_by at k
    seeds: int = 3                  # all: seed, seed+1, ...
    eval_problems: int = 60         # eval: per family, final eval (eval.jsonl holds up to 60)
    curve_problems: int = 20        # train: per family at each eval, for the accuracy-vs-tokens curve (0 = off)
    max_new_tokens: int = 72        # train, eval: greedy decode cap (solutions are 30-60 bytes); the prompt gets the rest
    timing_iters: int = 40          # timing: steps per run

    def __post_init__(self):
        super().__post_init__()
        require(self.stage in STAGES, f"--stage must be one of {', '.join(STAGES)}, got '{self.stage}'")
        require(0 < self.k <= 1, f'--k must be in (0, 1], got {self.k}')
        require(self.select_by in SELECT_BY, f"--select_by must be one of {', '.join(SELECT_BY)}")
        require(self.ref_mode in ('cached', 'online'), "--ref_mode must be 'cached' or 'online'")
        require(self.tokenizer == 'byte', "--tokenizer must be 'byte' (mathmix is byte-level)")
        require(self.model_type == 'gpt', '--model_type must be gpt (SLM selects next-token losses)')
        require(not self.branch_budgets, '--branch_budgets: slm.py runs no WSD branches')
        require(set(self.arms.split(',')) <= {'clm', *SELECT_BY}, f"--arms: a comma list of clm, {', '.join(SELECT_BY)}")
        require(self.seeds > 0 and min(self.ref_budget, self.eval_problems) > 0, '--seeds, --ref_budget, --eval_problems > 0')
        require(self.model_dims()['block_size'] - self.max_new_tokens >= 32, '--block_size must exceed --max_new_tokens by 32')
        base = {f.name: f.default for f in dataclasses.fields(self)} | (self.QUICK if self.quick else {})
        stray = [f'--{key}' for key in TRAIN_KEYS if getattr(self, key) != base[key]]
        require(self.stage in ('all', 'train', 'timing') or not stray,
                f"{', '.join(stray)}: read only by the stages that train arms (all, train, timing), not --stage={self.stage}")


@dataclass(frozen=True)
class Paths:
    root: Path        # out_dir
    ref_ckpt: Path
    ref_data: Path    # the clean corpus (its val split: clean target-domain val text)
    train_data: Path  # the noisy corpus: train.bin, noise.bin, ref_loss.bin, ref_loss.json
    eval_file: Path


def get_paths(cfg):
    data, root = Path(cfg.mathmix_dir) if cfg.mathmix_dir else DATA_ROOT / 'mathmix', Path(cfg.out_dir)
    return Paths(root, Path(cfg.ref_ckpt) if cfg.ref_ckpt else root / 'ref' / 'ckpt.pt',
                 data / 'ref' / 'byte', data / 'train' / 'byte', data / 'eval' / 'eval.jsonl')


def arm_name(k, select_by):
    return 'clm' if k == 1 else f'{select_by}_k{round(100 * k)}'


def run_dir(cfg, paths):
    return paths.root / f'{arm_name(cfg.k, cfg.select_by)}_s{cfg.seed}'


# -----------------------------------------------------------------------------
# stages

def ensure_data(cfg, paths):
    if all(p.exists() for p in (paths.ref_data / 'meta.json', paths.train_data / 'meta.json', paths.eval_file)):
        return
    if cfg.mathmix_dir:
        raise DataError(f'no mathmix data in {cfg.mathmix_dir}: run `python data/mathmix/prepare.py --out_dir={cfg.mathmix_dir}`')
    print(f'preparing {paths.train_data.parents[1]} (once)')
    prepare(PrepareConfig())


def stage_ref(cfg, paths):
    """The reference model: plain causal LM on the clean corpus (REF_KEYS, ref_budget), with the shared loop."""
    return train.train(train.TrainConfig(**{key: getattr(cfg, key) for key in REF_KEYS}, budget=cfg.ref_budget,
                                         out_dir=str(paths.ref_ckpt.parent), dataset=str(paths.ref_data)))


def stage_train(cfg, paths):
    """One SLM run on the noisy corpus (CLM when k = 1) into out_dir/<arm>_s<seed>."""
    run = dataclasses.replace(cfg, out_dir=str(run_dir(cfg, paths)), dataset=str(paths.train_data))
    return train.train(run, SelectiveLM(run, paths))


def stage_eval(cfg, paths, folder=None):
    """Few-shot accuracy, solution loss and clean val loss of a run's checkpoint -> <run>/eval.json."""
    folder, rt = folder or run_dir(cfg, paths), train.setup_device(cfg)
    ckpt = train.load_checkpoint(folder / 'ckpt.pt')  # its config and budget; the model is built once more below
    model = train.load_model(folder / 'ckpt.pt', rt.device, cfg.compile_loss)
    problems = load_problems(paths.eval_file, cfg.eval_problems)
    result, outputs = few_shot_eval(model, problems, rt, cfg.max_new_tokens)
    run_cfg, spent = ckpt['config'], ckpt['budget']
    val_x, val_y = clean_val(paths.ref_data, model.config.block_size, cfg.eval_batches * cfg.batch_size)
    out = {'run': folder.name, 'arm': 'ref (clean data)' if folder == paths.ref_ckpt.parent else
           arm_name(run_cfg['k'], run_cfg['select_by']), 'seed': run_cfg['seed'], 'tokens': spent['tokens'],
           'rst': spent['rst'], 'steps': ckpt['iter_num'], **result, 'n_problems': len(problems),
           'val_loss_clean': train.evaluate(model, (val_x,), val_y, cfg.batch_size, rt),
           'selection': ckpt['objective'].get('selection', {}),
           'examples': [{'question': p['question'], 'answer': p['answer'], 'output': o}
                        for p, o in zip(problems, outputs)][::max(1, len(problems) // 8)]}
    atomic_write_bytes(folder / 'eval.json', json.dumps(out, indent=1).encode())
    print(f"{folder.name}: accuracy {out['accuracy']:.3f} ({', '.join(f'{f} {a:.2f}' for f, a in out['per_family'].items())}) "
          f"| solution loss {out['solution_loss']:.4f} | clean val loss {out['val_loss_clean']:.4f}")
    return out


def stage_all(cfg, paths):
    """ref -> eval it -> score -> every arm x seed (train, eval) -> compare. Finished pieces are reused."""
    if cfg.overwrite or not paths.ref_ckpt.exists():
        stage_ref(cfg, paths)
    if cfg.overwrite or not (paths.ref_ckpt.parent / 'eval.json').exists():
        stage_eval(cfg, paths, paths.ref_ckpt.parent)
    try:
        load_cache(paths, cfg.model_dims()['block_size'])
    except DataError:
        build_cache(cfg, paths)
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        for arm in cfg.arms.split(','):
            run = dataclasses.replace(cfg, seed=seed, k=1.0 if arm == 'clm' else cfg.k,
                                      select_by='excess' if arm == 'clm' else arm)
            if (run_dir(run, paths) / 'eval.json').exists() and not cfg.overwrite:
                continue
            resume = (run_dir(run, paths) / 'ckpt.pt').exists() and not cfg.overwrite  # else nothing worth keeping
            stage_train(dataclasses.replace(run, init_from='resume' if resume else 'scratch', overwrite=not resume), paths)
            stage_eval(run, paths)
    return stage_compare(cfg, paths)


def stage_compare(cfg, paths):
    """CLM vs SLM vs ablations over every eval.json under out_dir: a table and a plot."""
    order = ALL_ARMS.split(',')  # clm, then SLM, then its ablations; the reference model last
    arms = {}
    for r in sorted((json.loads(p.read_text()) for p in paths.root.glob('*/eval.json')),
                    key=lambda r: (order.index(r['arm'].split('_')[0]) if r['arm'].split('_')[0] in order else 9, r['run'])):
        arms.setdefault(r['arm'], []).append(r)
    if not arms:
        raise DataError(f'no eval.json under {paths.root}: run `python slm.py` (or --stage=eval) first')

    def cell(values, fmt='.3f'):
        mean, half = t_interval(values)
        return f'{mean:{fmt}}' + ('' if math.isnan(half) else f' ± {half:{fmt}}')  # one seed: no interval

    cols = ['arm', 'seeds', 'tokens', 'accuracy', *FAMILIES, 'solution loss', 'clean val loss', 'sel clean', 'sel noise']
    lines = ['mean ± 95% CI half-width (t, over seeds)', '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for arm, rs in arms.items():
        sel = [r['selection'] for r in rs]
        row = [arm, str(len(rs)), f"{statistics.mean(r['tokens'] for r in rs) / 1e6:.2f}M", cell([r['accuracy'] for r in rs]),
               *[cell([r['per_family'][f] for r in rs]) for f in FAMILIES],
               cell([r['solution_loss'] for r in rs], '.4f'), cell([r['val_loss_clean'] for r in rs], '.4f'),
               *[cell([s[key] for s in sel]) if all(key in s for s in sel) else '-' for key in ('clean', 'all_noise')]]
        lines.append('| ' + ' | '.join(row) + ' |')
    table = '\n'.join(lines)
    print(table)
    (paths.root / 'compare.md').write_text(table + '\n')
    plot_curves(paths, arms)
    return table


def plot_curves(paths, arms):
    """Exact match and gold-solution loss vs training tokens per arm (mean over seeds of the curve
    points; a run without them gives its final eval), if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return print('(matplotlib is not installed: no plot)')
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ('accuracy', 'solution_loss')):
        for arm, rs in arms.items():
            curves = []
            for r in rs:
                path = paths.root / r['run'] / 'curve.jsonl'
                points = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
                curves.append([(p['tokens'], p[metric]) for p in points if metric in p] or [(r['tokens'], r[metric])])
            n = min(map(len, curves))
            ax.plot(*[[statistics.mean(c[i][j] for c in curves) for i in range(n)] for j in (0, 1)], marker='o', label=arm)
        ax.set(xlabel='training tokens', ylabel={'accuracy': 'few-shot exact match (mean of families)',
                                                 'solution_loss': 'loss of the gold solution (nats/byte)'}[metric])
    axes[0].legend()
    fig.suptitle(f'Rho-1 SLM on mathmix, held-out problems ({paths.root})')
    fig.savefig(paths.root / 'compare_accuracy.png', dpi=120, bbox_inches='tight')
    print(f"wrote {paths.root / 'compare_accuracy.png'}")


def stage_export(cfg, paths):
    """The static "concentrated" mask: the k fraction of all tokens with the lowest ref_loss
    (select_by='reference', once, globally). Excess-loss selection has no such mask: see the top."""
    T = train.load_checkpoint(paths.ref_ckpt)['model_args']['block_size']
    ref_loss = np.asarray(load_cache(paths, T), dtype=np.float32)
    scored = np.zeros(len(ref_loss), dtype=bool)
    scored[1:num_examples(ref_loss, T) * T + 1] = True
    mask = scored & (ref_loss <= np.quantile(ref_loss[scored], cfg.k))
    path = paths.train_data / f'concentrated_k{round(100 * cfg.k)}.bin'
    atomic_write_bytes(path, mask.astype(np.uint8).tobytes())
    kinds = np.fromfile(paths.train_data / 'noise.bin', dtype=np.uint8)
    rates = {name: float(mask[scored & (kinds == i)].mean()) for i, name in enumerate(NOISE_KINDS) if (scored & (kinds == i)).any()}
    print(f'wrote {path}: {mask.sum():,} of {scored.sum():,} tokens kept; kept rate by kind {rates}')
    return rates


def stage_timing(cfg, paths):
    """Seconds per step of SLM (cached, online) and plain CLM, from interleaved runs in one process."""
    base = dataclasses.replace(cfg, budget_unit='iters', budget=cfg.timing_iters, eval_interval=10 ** 6, log_interval=5,
                               curve_problems=0, overwrite=True, init_from='scratch', dataset=str(paths.train_data))
    seconds = {'clm': [], 'cached': [], 'online': []}
    for rep in range(3):  # rep 0 warms up (compile, caches) and is not counted
        for mode in seconds:
            run = dataclasses.replace(base, out_dir=str(paths.root / 'timing' / mode), ref_mode='online' if mode == 'online' else 'cached')
            train.train(run, None if mode == 'clm' else SelectiveLM(run, paths))
            logs = [json.loads(line) for line in (paths.root / 'timing' / mode / 'log.jsonl').read_text().splitlines()]
            per_step = [run.batch_size * run.model_dims()['block_size'] / r['tokens_per_s'] for r in logs if 'tokens_per_s' in r]
            seconds[mode] += per_step[1:] if rep else []
    med = {m: statistics.median(v) for m, v in seconds.items()}
    out = {'seconds_per_step': med, 'cached/clm': med['cached'] / med['clm'], 'online/clm': med['online'] / med['clm']}
    (paths.root / 'timing.json').write_text(json.dumps(out, indent=1))
    print(f"per-step time, SLM / CLM: cached {out['cached/clm']:.3f}x, online {out['online/clm']:.3f}x ({med})")
    return out


STAGE_FNS = {'all': stage_all, 'ref': stage_ref, 'score': build_cache, 'train': stage_train, 'eval': stage_eval,
             'compare': stage_compare, 'export': stage_export, 'timing': stage_timing}


def main(cfg):
    paths = get_paths(cfg)
    if cfg.stage != 'compare':
        ensure_data(cfg, paths)
    return STAGE_FNS[cfg.stage](cfg, paths)


if __name__ == '__main__':
    cli(main, SLMConfig)
