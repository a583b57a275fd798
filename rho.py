"""Batch selection: RHO-LOSS and Selective Backprop, as objectives of the shared loop.

RHO-LOSS: Mindermann et al. 2022, "Prioritized Training on Points that are Learnable, Worth Learning,
and Not Yet Learnt", arXiv 2206.07137.
  1. Train an irreducible-loss (IL) model of the same architecture on a holdout split of the training
     stream, until its held-out loss stops improving (budget doublings, train_il); store its loss on every
     other training example, keyed by example id, once.
  2. Each step, score a mega-batch of nB examples with the current model (no grad).
  3. Train on the nb examples with the largest reducible loss = training loss - irreducible loss.

Selective Backprop: Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers",
arXiv 1910.00762.
  1. Score each example with a no-grad forward; add its loss to a history of recent losses.
  2. Keep it with probability (percentile of its loss in that history) ** beta.
  3. Kept examples fill a buffer; train on a full batch whenever one is ready (leftovers carry over).

RST (No Train No Gain, arXiv 2307.06440): scoring forwards are charged as forward-only passes at the
number of examples scored, trained examples as usual. IL training and the IL precompute are reported
separately and, as in that paper, left out of the budget unless --charge_il=True.

    python rho.py                                  # RHO-LOSS: IL model + cache, then the target run
    python rho.py --stage=il                       # only the IL model (out/rho_il) and its cache (rerun: resumes)
    python rho.py --stage=train --select_frac=0.1  # reuse the cache (a stale one is refused)
    python rho.py --method=sb --out_dir=out/sb     # Selective Backprop
"""
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import budget as budget_lib
import runs
import train
from configurator import UserError, cli, key, require
from data.loader import NUMBER, DataError, atomic_write_bytes, file_sha256, get_examples, num_examples, read_json
from model import evaluating
from train import CausalLM, Step, TrainConfig


# -----------------------------------------------------------------------------
# the two objectives

class RhoLoss(CausalLM):
    """RHO-LOSS: score nB, train on the top nb by reducible loss."""

    def __init__(self, cfg):
        super().__init__(cfg.batch_size)
        self.cfg = cfg
        self.n_B, self.n_b = cfg.selection_sizes()

    def setup(self, ctx):
        self.block_size = T = ctx.model.config.block_size
        train_k, _ = split_examples(num_examples(ctx.corpus.splits['train'], T), self.cfg.holdout_frac)
        ctx.restrict_examples(train_k)  # the target run never sees the IL model's holdout
        losses, info = load_il_cache(self.cfg, ctx.corpus, T)
        self.irreducible_loss = torch.from_numpy(losses.astype(np.float32)).to(ctx.device)  # (n_examples,)
        if not torch.isfinite(self.irreducible_loss[torch.from_numpy(train_k)]).all():
            raise UserError('the IL cache has no loss for some training examples: rebuild it with --stage=il')
        report_il(ctx, info, self.cfg.charge_il)

    def __call__(self, model, data, ctx):
        x, y, ids = data.next(self.n_B)                                    # (nB, T)
        train_loss = score_examples(model, x, y)                           # (nB,)
        ctx.charge_forward(self.n_B, len(ctx.model.active_layers))
        irreducible_loss = self.irreducible_loss[(ids // self.block_size).to(train_loss.device)]
        reducible_loss = train_loss - irreducible_loss
        top = select_top(reducible_loss, self.n_b)                         # (nb,)
        loss = model(x[top], y[top], weight=1 / y[top].numel())
        return Step(loss, self.n_b, {'selected_frac': self.n_b / self.n_B, 'loss_selected': train_loss[top].mean(),
                                     'loss_scored': train_loss.mean(), 'il_selected': irreducible_loss[top].mean()})


SB_HISTORY_BATCHES = 10  # --sb_history=0: the history holds the last 10 micro-batches' scored losses


class SelectiveBackprop(CausalLM):
    """Selective Backprop: keep each scored example with probability percentile ** beta; train on full batches.

    The history's size decides what a percentile means. The paper's 5000 losses span a whole short run, so
    early (larger) losses dominate it, current losses sit at low percentiles, and far fewer than half are
    kept at beta = 1. The rule here: the history holds the losses scored in the last SB_HISTORY_BATCHES
    micro-batches (a few steps of the run), so an example is ranked against the model's current losses; a
    percentile is then close to uniform and beta = 1 keeps about half (the run logs selected_frac)."""

    def __init__(self, cfg):
        super().__init__(cfg.batch_size)
        self.beta, self.history_len = cfg.sb_beta, cfg.sb_history or SB_HISTORY_BATCHES * cfg.batch_size
        self.history = torch.zeros(0)                    # the last sb_history scored losses, oldest first
        self.buffer_ids, self.buffer_losses = [], []     # kept examples waiting for a full batch
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def setup(self, ctx):
        if ctx.rt.world_size > 1:  # ranks would fill buffers at different rates and budgets would diverge
            raise UserError('Selective Backprop runs on one process: launch it without torchrun')

    def keep_prob(self, losses):
        """(percentile of each loss among the last sb_history losses, these included) ** beta."""
        self.history = torch.cat([self.history, losses])[-self.history_len:]
        rank = torch.searchsorted(self.history.sort().values, losses, right=True)  # history losses <= each
        return (rank / len(self.history)) ** self.beta

    def __call__(self, model, data, ctx):
        scored, kept = [], 0
        while len(self.buffer_ids) < self.batch_size:
            x, y, ids = data.next(self.batch_size)
            losses = score_examples(model, x, y).cpu()                     # (B,)
            ctx.charge_forward(len(ids), len(ctx.model.active_layers))
            keep = torch.rand(len(losses), generator=self.generator) < self.keep_prob(losses)
            self.buffer_ids += ids[keep].tolist()
            self.buffer_losses += losses[keep].tolist()
            scored.append(losses)
            kept += int(keep.sum())
        ids, kept_losses = self.buffer_ids[:self.batch_size], self.buffer_losses[:self.batch_size]
        del self.buffer_ids[:self.batch_size], self.buffer_losses[:self.batch_size]
        x, y = get_examples(ctx.corpus.splits['train'], np.array(ids), ctx.model.config.block_size)
        y = y.to(ctx.device)
        loss = model(x.to(ctx.device), y, weight=1 / y.numel())
        scored = torch.cat(scored)
        return Step(loss, len(ids), {'selected_frac': kept / len(scored),
                                     'loss_selected': sum(kept_losses) / len(kept_losses), 'loss_scored': scored.mean()})

    def state_dict(self):
        return {'history': self.history, 'buffer_ids': torch.tensor(self.buffer_ids, dtype=torch.int64),
                'buffer_losses': torch.tensor(self.buffer_losses), 'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        self.history = state['history']
        self.buffer_ids, self.buffer_losses = state['buffer_ids'].tolist(), state['buffer_losses'].tolist()
        self.generator.set_state(state['generator'])


@torch.no_grad()
def score_examples(model, x, y):
    """Each example's loss (mean over its tokens) under the current weights, in eval mode: (n,) fp32.
    The one scoring function of both methods and the IL precompute. A DDP-wrapped model is called as
    is: without grad its forward registers nothing for the backward."""
    with evaluating(model):
        return model(x, y).mean(dim=1).float()  # (n, T) per-token losses from the compiled loss path -> (n,)


def select_top(scores, k):
    """Positions of the k largest scores; ties go to the earlier position (a stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def holdout_mask(n_examples, holdout_frac):
    """True where example k is in the IL model's holdout. A fixed hash of k (splitmix64), so the split
    is the same for every seed and run and cannot drift with a library's random-number stream."""
    return holdout_hash(n_examples) < holdout_frac


def holdout_hash(n_examples):
    """A uniform number in [0, 1) per example k: k is held out when it is below holdout_frac."""
    z = np.arange(n_examples, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


def split_examples(n_examples, holdout_frac):
    """(train, holdout): example indices k (id = k * block_size); the target run sees only train. A holdout_frac
    that leaves either side empty is refused with the range that does not (none, for a single example)."""
    hold = holdout_mask(n_examples, holdout_frac)
    train_k, holdout_k = np.flatnonzero(~hold), np.flatnonzero(hold)
    if n_examples < 2:
        raise DataError(f'{n_examples} training examples are too few to hold some out: use a bigger corpus or a smaller '
                        f'--block_size')
    if len(train_k) == 0 or len(holdout_k) == 0:
        u = holdout_hash(n_examples)  # held out: u < holdout_frac; so the lowest u must be below it, the highest not
        low, high = round_to(np.nextafter(u.min(), 1), up=True), round_to(u.max(), up=False)
        raise DataError(f"--holdout_frac={holdout_frac:g} puts {'none' if len(holdout_k) == 0 else 'all'} of the "
                        f"{n_examples:,} training examples in the IL model's holdout: give --holdout_frac in [{low:g}, {high:g}]")
    return train_k, holdout_k


def round_to(x, up, digits=3):
    """x > 0 rounded up (or down) to `digits` significant digits: a suggested bound that passes its check."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return (math.ceil if up else math.floor)(x * scale) / scale


# -----------------------------------------------------------------------------
# the IL model and its cache of irreducible losses

class HoldoutLM(CausalLM):
    """The IL model's objective: the baseline loss on the holdout examples only."""

    def __init__(self, cfg):
        super().__init__(cfg.batch_size)
        self.holdout_frac = cfg.holdout_frac

    def setup(self, ctx):
        T = ctx.model.config.block_size
        ctx.restrict_examples(split_examples(num_examples(ctx.corpus.splits['train'], T), self.holdout_frac)[1])


# Keys of the target run only: the IL model is a plain baseline, full depth with AdamW (the defaults).
TARGET_ONLY = ('arch', 'stack_init_layers', 'stack_fracs', 'stack_optim', 'theta_bar', 'gamma_f',
               'optimizer', 'rho', 'hess_interval', 'free_hessian', 'muon_lr', 'muon_momentum', 'muon_scale')


def il_config(cfg, budget):
    """One IL run of the search (il_search_dir): the target's data, shape, AdamW keys, schedule, eval and
    system keys; its own folder and budget; TARGET_ONLY keys at their defaults."""
    own = {'out_dir': str(il_search_dir(cfg) / f'b{budget:g}'), 'budget': budget, 'label': runs.IL_LABEL,  # not a baseline
           'init_from': 'scratch', 'overwrite': True, **{k: getattr(TrainConfig, k) for k in TARGET_ONLY}}
    return TrainConfig(**{f.name: own.get(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(TrainConfig)})


def il_search_dir(cfg):
    return Path(cfg.il_out_dir) / 'search'


def il_run(run, cfg, need_checkpoint=False):
    """Train one IL run, resume it if it was killed, or read it if it finished with this config ->
    {'val_loss', 'steps', 'spent'}, or None if interrupted. A finished run whose checkpoint is gone (a sweep
    restored from its committed logs and configs) is read from its log, unless its checkpoint is needed:
    only the search's best run becomes the IL model, so only it is trained again."""
    folder = Path(run.out_dir)
    same = runs.records_config(folder, dataclasses.asdict(run))
    finished = same and runs.run_finished(folder)
    if finished and (folder / 'ckpt.pt').exists():
        ckpt = runs.load_checkpoint(folder / 'ckpt.pt')
        return {'val_loss': ckpt['val_loss'], 'steps': ckpt['iter_num'],
                'spent': {k: v for k, v in ckpt['budget'].items() if k != 'rst_by_entry'}}
    final = [r for r in runs.read_log(folder / 'log.jsonl') if 'val_loss' in r][-1] if finished else {}
    if final.get(run.budget_unit, 0) >= run.budget and not need_checkpoint:  # its last eval spent the budget
        return {'val_loss': final['val_loss'], 'steps': final['step'],
                'spent': {k: v for k, v in final.items() if k not in ('step', 'val_loss', 'rst_by_entry')}}
    if same and (folder / 'ckpt.pt').exists():
        run = dataclasses.replace(run, init_from='resume', overwrite=False)
    result = train.train(run, HoldoutLM(cfg))
    return None if result['interrupted'] else result


def check_il_out_dir(cfg):
    """il_out_dir receives the best search run's files, il_cache the losses: refuse, before any training, a
    file in their place, or an il_out_dir that holds another run (one that is not an IL model) unless
    --overwrite=True."""
    folder = Path(cfg.il_out_dir)
    for name, path in (('il_out_dir', folder), ('il_cache', Path(cfg.il_cache) if cfg.il_cache else None)):
        if path is not None and path.exists() and not path.is_dir():
            raise UserError(f'--{name}={path} is a file: give a folder')
    holds = [name for name in ('ckpt.pt', 'log.jsonl') if (folder / name).exists()]
    saved = read_json(folder / 'config.json').get('config')  # {} when missing or damaged: not an IL model's
    if holds and not (isinstance(saved, dict) and saved.get('label') == runs.IL_LABEL) and not cfg.overwrite:
        raise UserError(f'--il_out_dir={folder} already holds a run that is not an IL model: give another '
                        f'--il_out_dir, or --overwrite=True to replace it')


def train_il(cfg):
    """Train the IL model on the holdout until its held-out (val) loss stops improving: fully decayed runs
    at il_budget (at least the largest budget it serves; or il_budget_frac of this run's), 2x, 4x, ... until a
    doubling gains less than il_tol (at most il_doublings doublings). The best run becomes the IL model (its
    files are copied to il_out_dir), every run's cost is the IL training cost; then precompute its cache.
    Resumable."""
    check_il_out_dir(cfg)
    budget, tried, spent = cfg.il_first_budget(), [], {u: 0.0 for u in ('rst', 'tokens', 'flops', 'wall')}
    for i in range(cfg.il_doublings + 1):
        run = il_config(cfg, budget * 2 ** i)
        print(f'--- IL model: {run.budget:g} {cfg.budget_unit} on the {cfg.holdout_frac:.0%} holdout, '
              f'full depth, AdamW -> {run.out_dir}')
        result = il_run(run, cfg)
        if result is None:
            print('IL training interrupted: the same command resumes it')
            return None
        tried.append((run, result))
        spent = {u: None if None in (spent[u], result['spent'].get(u)) else spent[u] + result['spent'][u] for u in spent}
        if i and tried[-2][1]['val_loss'] - result['val_loss'] < cfg.il_tol:
            still_improving = False
            break
    else:  # no doubling stopped the search: the last one allowed still gained >= il_tol
        still_improving = len(tried) > 1
    best_run, best = min(tried, key=lambda t: t[1]['val_loss'])
    if not (Path(best_run.out_dir) / 'ckpt.pt').exists():  # read from its log: train it again for its weights
        print(f'--- IL model: the {best_run.budget:g} run has no checkpoint, training it again')
        best = il_run(best_run, cfg, need_checkpoint=True)
        if best is None:
            print('IL training interrupted: the same command resumes it')
            return None
        tried = [(r, best if r is best_run else res) for r, res in tried]  # its cost counted once (the search's)
    print('IL search: ' + ', '.join(f"{r.budget:g} -> {res['val_loss']:.4f}" for r, res in tried) +
          f' (val loss); the IL model is the {best_run.budget:g} run' +
          ('; still improving at the last doubling allowed: raise --il_doublings for a better IL model'
           if still_improving else ''))
    for name in ('ckpt.pt', 'log.jsonl', 'config.json'):  # the IL model's run folder: the best run's files
        atomic_write_bytes(Path(cfg.il_out_dir) / name, (Path(best_run.out_dir) / name).read_bytes())
    result = {**best, 'spent': spent, 'search': [(r.budget, res['val_loss']) for r, res in tried], 'still_improving': still_improving}
    precompute_il(cfg, result)
    return result


def cache_dir(cfg, corpus):
    return Path(cfg.il_cache) if cfg.il_cache else corpus.path / 'il' / Path(cfg.il_out_dir).name


def cache_identity(cfg, corpus, block_size, saved=None):
    """What the IL losses were computed from: the IL checkpoint, the data, the example size and holdout.
    saved: the corpus fingerprint a cache's sidecar holds (Corpus.as_named: an older one named the first tokens)."""
    ckpt = Path(cfg.il_out_dir) / 'ckpt.pt'
    return {'corpus_fingerprint': corpus.as_named(saved), 'tokenizer': corpus.meta['tokenizer'], 'block_size': block_size,
            'holdout_frac': cfg.holdout_frac, 'num_examples': num_examples(corpus.splits['train'], block_size),
            'il_ckpt_sha256': file_sha256(ckpt) if ckpt.is_file() else 'missing'}


PROGRESS_EVERY = 30.0  # seconds between the IL precompute's progress lines, each with a save of its partial cache


def precompute_il(cfg, il_result):
    """One no-grad pass of the IL checkpoint over every training example -> the cache (runs.save_cache).
    Resumable: a killed precompute continues from its partial cache (score_resumably)."""
    rt, corpus = runs.setup_device(cfg), train.load_corpus(cfg)
    ckpt_path = Path(cfg.il_out_dir) / 'ckpt.pt'
    model = runs.load_model(ckpt_path, rt.device, compile_loss=cfg.compile_loss)
    T, tokens = model.config.block_size, corpus.splits['train']
    train_k, _ = split_examples(num_examples(tokens, T), cfg.holdout_frac)
    # batch, device and dtype decide a loss's low bits: a resume keeps them (saved_fingerprint: and it continues a
    # partial cache saved while the fingerprint named only the first tokens)
    partial_path = cache_dir(cfg, corpus) / 'il_loss.partial.f16'
    partial = PartialCache(partial_path, {**cache_identity(cfg, corpus, T, saved_fingerprint(partial_path)),
                                          'score_batch': cfg.selection_sizes()[0], 'device': rt.device.type,
                                          'dtype': str(rt.dtype)})
    irreducible_loss, seconds = score_resumably(model, tokens, train_k, rt, cfg.selection_sizes()[0], partial)
    # the precompute's RST, as forward-only passes (None without a cost table: the other units still count)
    table = budget_lib.load_table(train.run_shape_key(cfg, model), cfg.rst_table, required=False)
    accountant = budget_lib.Budget('iters', 1, table, model.flops_per_token, T, cfg.batch_size)
    accountant.charge_forward(len(train_k), model.n_layer)
    info = {'il_ckpt': str(ckpt_path), 'il_val_loss': il_result['val_loss'], 'il_steps': il_result['steps'],
            'il_search': il_result.get('search', []), 'il_still_improving': il_result.get('still_improving', False),
            'il_train': {u: il_result['spent'][u] for u in ('rst', 'tokens', 'flops', 'wall')},
            'il_precompute': {'examples': len(train_k), 'rst': accountant.spent['rst'],
                              'flops': accountant.spent['flops'], 'wall': seconds}}
    out = cache_dir(cfg, corpus) / 'il_loss.f16'
    info = runs.save_cache(out, irreducible_loss, cache_identity(cfg, corpus, T), info)
    partial.remove()
    print(f'IL cache: {len(train_k):,} examples in {seconds:.1f}s -> {out}')
    return info


def score_resumably(model, tokens, train_k, rt, n_B, partial):
    """score_examples over train_k, n_B at a time -> (irreducible losses (n_examples,) float16, NaN where never
    looked up; seconds spent, earlier runs' included). Every PROGRESS_EVERY seconds a progress line and a save
    of the losses so far (the partial cache), and one on Ctrl-C/SIGTERM: a kill -9 loses at most that long."""
    T = model.config.block_size
    irreducible_loss, start, seconds = partial.load(num_examples(tokens, T))
    done, t0, last = start, time.time(), time.time()
    report = runs.progress('IL precompute', len(train_k), 'examples', start, every=0)  # printed with each save below
    try:
        for i in range(start, len(train_k), n_B):
            k = train_k[i:i + n_B]
            x, y = get_examples(tokens, k * T, T)
            with rt.autocast():
                irreducible_loss[k] = score_examples(model, x.to(rt.device), y.to(rt.device)).cpu().numpy()
            done = i + len(k)
            if time.time() - last >= PROGRESS_EVERY:
                partial.save(irreducible_loss, done, seconds + time.time() - t0)
                report(done)
                last = time.time()
    except KeyboardInterrupt:
        partial.save(irreducible_loss, done, seconds + time.time() - t0)
        print(f'IL precompute interrupted after {done:,} of {len(train_k):,} examples: the same command continues it')
        raise
    return irreducible_loss, seconds + time.time() - t0


class PartialCache:
    """The IL losses of the examples scored so far (train_k[:done]), a runs.save_cache of the whole array with
    `done` and `wall` in its sidecar; a rerun continues it only under the same identity (else starts over)."""
    INFO = {'done': int, 'wall': NUMBER}

    def __init__(self, path, identity):
        self.path, self.identity = Path(path), identity

    def load(self, n_examples):
        """(losses (n_examples,), examples done, seconds spent): the saved ones, or a fresh start."""
        fresh = np.full(n_examples, np.nan, dtype=np.float16), 0, 0.0
        if not self.path.with_suffix('.json').exists():
            return fresh
        try:
            saved, side = runs.load_cache(self.path, self.identity, 'partial IL cache', 'starting the precompute over',
                                          self.INFO, error=UserError)
        except UserError as e:
            print(e)
            return fresh
        print(f"IL precompute: resuming after {side['done']:,} examples ({self.path})")
        return np.array(saved), side['done'], side['wall']

    def save(self, losses, done, seconds):
        runs.save_cache(self.path, losses, self.identity, {'done': done, 'wall': seconds})

    def remove(self):
        for path in (self.path.with_suffix('.json'), self.path):  # the sidecar first: never a payload without one read
            path.unlink(missing_ok=True)


IL_INFO_KEYS = {'il_val_loss': NUMBER, 'il_train': dict, 'il_precompute': dict}  # what report_il reads


def load_il_cache(cfg, corpus, block_size):
    """The irreducible losses (memmap, index k = example id k * block_size) and their sidecar; refused
    (one line, with the rebuild command) when built for other data, settings or IL checkpoint, or edited."""
    rebuild = "rebuild it with `python rho.py --stage=il --overwrite=True` with this run's data and model flags"
    path = cache_dir(cfg, corpus) / 'il_loss.f16'
    return runs.load_cache(path, cache_identity(cfg, corpus, block_size, saved_fingerprint(path)), 'IL cache', rebuild,
                           IL_INFO_KEYS, error=UserError)


def saved_fingerprint(path):
    """The corpus fingerprint a cache's sidecar holds (None: none readable), for cache_identity's saved."""
    saved = read_json(path.with_suffix('.json')).get('identity')
    return saved.get('corpus_fingerprint') if isinstance(saved, dict) else None


def rst(v):
    return 'no' if v is None else f'{v:.2f}'  # None: no cost table for this shape


def report_il(ctx, info, charge_il):
    """Print the IL costs; log them and, with charge_il, add them to this run's budget. The loop applies
    both to a fresh run only: a resumed run's log and budget already hold them."""
    il, pre = info['il_train'], info['il_precompute']
    ctx.rt.print(f"IL model: {rst(il['rst'])} RST s, {il['tokens']:,.0f} tokens, {il['wall']:.1f}s wall, val loss "
                 f"{info['il_val_loss']:.4f} | IL precompute: {pre['examples']:,} examples, {rst(pre['rst'])} RST s, "
                 f"{pre['wall']:.1f}s wall | {'charged to' if charge_il else 'left out of'} this budget")
    ctx.log({'step': 0, 'il_train_rst': il['rst'], 'il_train_tokens': il['tokens'], 'il_train_wall': il['wall'],
             'il_precompute_rst': pre['rst'], 'il_precompute_wall': pre['wall'], 'il_charged': charge_il,
             'il_val_loss': info['il_val_loss']})
    if charge_il:  # the precompute trains no tokens; a stage without a cost table counts no rst
        ctx.charge_before_start({u: (il[u] or 0.0) + (pre.get(u) or 0.0) for u in ('rst', 'tokens', 'flops', 'wall')})


def il_cache_is_valid(cfg):
    corpus = train.load_corpus(cfg)
    try:
        load_il_cache(cfg, corpus, cfg.model_dims()['block_size'])
    except UserError as e:
        print(f'IL cache not usable, training the IL model: {e}')
        return False
    print(f'reusing the IL cache in {cache_dir(cfg, corpus)} (it matches this data and IL checkpoint)')
    return True


# -----------------------------------------------------------------------------
# config and stages

@dataclass(frozen=True)
class RhoConfig(TrainConfig):
    """TrainConfig's keys configure the target run (train). The IL model (il) reuses its data, shape, AdamW
    (lr, min_lr, weight_decay, beta1, beta2, grad_clip), schedule, eval and system keys; it is always a
    plain baseline, full depth with AdamW: the arch keys (arch, stack_*, theta_bar, gamma_f), Sophia's and Muon's
    are the target's only, and a non-AdamW --optimizer is refused when the IL model trains."""
    out_dir: str = 'out/rho'         # train: the target run's folder (the IL model's is il_out_dir)
    method: str = 'rho'              # both: 'rho' (RHO-LOSS) or 'sb' (Selective Backprop, no IL model)
    stage: str = 'all'               # 'il' (IL model + cache), 'train' (needs the cache), 'all' (il if no valid cache, then train)
    holdout_frac: float = 0.2        # both: the IL model's share of the training examples, never trained on by the target (NTNG: 20%)
    select_frac: float = 0.5         # train: nb/nB (No Train No Gain: 0.5; the RHO-LOSS paper: 0.1)
    mega_batch: int = 0              # train: nB, examples scored per micro-batch; 0 = batch_size / select_frac (nb = batch_size)
    sb_beta: float = 1.0             # train, sb: keep probability = percentile ** sb_beta
    sb_history: int = 0              # train, sb: losses the percentile is taken over; 0 = the last 10 micro-batches' (see SelectiveBackprop)
    il_out_dir: str = key('out/rho_il', 'path')  # both: the IL model's run; train checks the cache against its checkpoint
    il_budget: float = 0.0           # il: the IL model's first budget in budget_unit; 0 = --budget
    il_budget_frac: float = 0.0      # il: > 0 sets that first budget to this fraction of --budget (the IL model paid from it,
                                     # with --charge_il and --il_doublings=0: an IL-charged run that can train)
    il_doublings: int = 2            # il: then 2x, 4x, ... that budget while its val loss keeps improving (0: one run)
    il_tol: float = 0.01             # il: a doubling that lowers the IL model's val loss by less has stopped improving
    il_cache: str = ''               # both: folder of il_loss.f16 + its sidecar il_loss.json; '' = <data dir>/il/<name of il_out_dir>
    charge_il: bool = False          # train: add IL training + precompute (rst, tokens, flops, wall) to this budget (the paper: no)

    def __post_init__(self):
        super().__post_init__()
        require(self.method in ('rho', 'sb'), f"--method must be 'rho' or 'sb', got '{self.method}'")
        require(self.stage in ('il', 'train', 'all'), f"--stage must be 'il', 'train' or 'all', got '{self.stage}'")
        require(self.method == 'rho' or self.stage != 'il',
                'Selective Backprop has no IL model: --stage=il needs --method=rho')
        require(self.method == 'sb' or self.stage == 'train' or self.optimizer == 'adamw',
                f"the IL model trains with AdamW on this run's --lr and --weight_decay: build it with --stage=il, "
                f'then pass --optimizer={self.optimizer} with --stage=train')
        require(self.model_type == 'gpt', 'rho.py selects GPT examples: --model_type=t5 is not supported')
        require(not self.branch_budgets, "--branch_budgets is train.py's: rho.py runs one budget")
        require(0 < self.holdout_frac < 1, f'--holdout_frac must be in (0, 1), got {self.holdout_frac}')
        require(0 < self.select_frac <= 1, f'--select_frac must be in (0, 1], got {self.select_frac}')
        require(self.mega_batch >= 0, f'--mega_batch must be >= 0, got {self.mega_batch}')
        default = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ('select_frac', 'mega_batch'):  # RHO-LOSS's keys, which sb would ignore
            require(self.method == 'rho' or getattr(self, name) == default[name], f"--{name} is RHO-LOSS's (--method=rho): "
                    'Selective Backprop keeps each example by its loss percentile (--sb_beta); leave it out')
        require(self.sb_beta > 0 and self.sb_history >= 0, '--sb_beta must be positive and --sb_history >= 0')
        require(self.il_budget >= 0, f'--il_budget must be >= 0, got {self.il_budget}')
        require(0 <= self.il_budget_frac and not (self.il_budget and self.il_budget_frac),
                f'--il_budget={self.il_budget:g} and --il_budget_frac={self.il_budget_frac:g}: give one of them (a budget, '
                f'or a fraction of --budget), and a fraction >= 0')
        require(self.il_doublings >= 0 and self.il_tol >= 0, '--il_doublings and --il_tol must be >= 0')
        require(Path(self.il_out_dir).resolve() != Path(self.out_dir).resolve(), '--il_out_dir must differ from --out_dir')
        require(self.il_cache == '' or self.il_cache.strip() != '',  # '' is the default folder; ' ' a stray folder
                f"--il_cache={self.il_cache!r} is blank: give a folder, or '' for <data dir>/il/<name of il_out_dir>")
        self.check_sizes()

    def check_sizes(self):
        """Counts against what they imply, before anything is built; those that need the data: check_selection."""
        n_B, n_b = self.selection_sizes()
        require(n_b >= 1, f'--select_frac={self.select_frac:g} selects round({self.select_frac:g} x {n_B}) = 0 of the '
                          f'--mega_batch={n_B} examples scored: give --select_frac >= {1 / n_B:.4g} (1/{n_B}), the '
                          f'smallest that selects one')
        first = self.il_first_budget()
        most = min(sys.float_info.max_exp - 1, math.floor(math.log2(sys.float_info.max) - math.log2(first)))  # 2**i too
        require(self.il_doublings <= most, f'--il_doublings={self.il_doublings}: the last IL run\'s budget (2**'
                                           f'{self.il_doublings} x {first:g}) is beyond a float: give at most {most}')
        fits = runs.free_memory(torch.device('cpu')) // SB_BYTES_PER_LOSS
        require(self.sb_history <= fits, f'--sb_history={self.sb_history:,} losses need {SB_BYTES_PER_LOSS} bytes each '
                                         f'to sort, more than the free memory holds: give at most {fits:,}')

    def il_first_budget(self):
        """The IL search's first budget: --il_budget, a fraction of --budget (--il_budget_frac), or --budget."""
        return self.il_budget_frac * self.budget if self.il_budget_frac else (self.il_budget or self.budget)

    def selection_sizes(self):
        """(nB, nb): examples scored and examples trained per micro-batch."""
        n_B = self.mega_batch or round(self.batch_size / self.select_frac)
        return n_B, round(self.select_frac * n_B)


SB_BYTES_PER_LOSS = 24  # Selective Backprop's history: the losses, and a sorted copy with its int64 indices


def check_selection(cfg):
    """Before any training: the nB examples scored per micro-batch (the IL precompute's batch too) exist outside
    the holdout, and their scoring forward fits the device (runs.check_memory's activations, one block deep)."""
    d, n_B = cfg.model_dims(), cfg.selection_sizes()[0]
    T, device = d['block_size'], runs.setup_device(cfg).device
    n_all = num_examples(train.load_corpus(cfg).splits['train'], T)
    n_train = len(split_examples(n_all, cfg.holdout_frac)[0])
    per_example = 4 * T * (16 * d['n_embd'] + 2 * d['n_head'] * T)
    fits = runs.free_memory(device) // per_example
    limit, why = (n_train, f'the {n_train:,} training examples outside the holdout') if n_train <= fits else \
        (fits, f'what fits in the free memory of {device} ({per_example / 2**20:.1f} MiB an example)')
    if n_B > limit:
        given = f'--mega_batch={cfg.mega_batch}' if cfg.mega_batch else \
            f'--select_frac={cfg.select_frac:g} (nB = --batch_size / --select_frac)'
        fixes = selection_fixes(cfg, limit, n_B, n_all, data_bound=n_train <= fits)
        raise UserError(f"{given} scores nB = {n_B:,} examples per micro-batch, more than {why}: give {' or '.join(fixes)}")


def selection_fixes(cfg, limit, n_B, n_all, data_bound):
    """Only fixes that pass check_selection: nB = --mega_batch, else --batch_size / --select_frac (select_frac
    <= 1); where the data is the limit, a holdout that leaves nB (~ its share)."""
    if limit == 0 and not data_bound:
        return ['a smaller --model or --block_size (not one example fits)']
    b = cfg.batch_size
    if cfg.mega_batch:
        fixes = [f'--mega_batch <= {limit:,}'] if limit else []
    else:
        fixes = ([f'--select_frac >= {round_to(b / limit, up=True):g}'] if b <= limit else []) + (
            [f'--batch_size <= {math.floor(limit * cfg.select_frac):,}'] if limit * cfg.select_frac >= 1 else [])
    holdout = round_to(1 - 1.01 * n_B / n_all, up=False) if data_bound and n_B < 0.99 * n_all else 0
    return fixes + ([f'--holdout_frac <= {holdout:g}'] if holdout > 0 else []) or ['a larger corpus']


def main(cfg):
    if cfg.method == 'sb':
        return train.train(cfg, SelectiveBackprop(cfg))
    if cfg.stage != 'train' and 'RANK' in os.environ:  # the precompute is one pass on one process
        raise UserError('the IL stage runs on one process: run --stage=il with python, then --stage=train under torchrun')
    check_selection(cfg)
    if cfg.stage == 'il' or (cfg.stage == 'all' and not il_cache_is_valid(cfg)):
        result = train_il(cfg)
        if cfg.stage == 'il' or result is None:
            return result
    n_B, n_b = cfg.selection_sizes()
    print(f'--- RHO-LOSS: score nB={n_B}, train nb={n_b} per micro-batch -> {cfg.out_dir}')
    return train.train(cfg, RhoLoss(cfg))


if __name__ == '__main__':
    cli(main, RhoConfig)
