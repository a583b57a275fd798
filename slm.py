"""Rho-1: Selective Language Modeling (SLM): train only on the tokens a reference model says are worth it.

Paper: "Rho-1: Not All Tokens Are What You Need" (Lin et al. 2024, arXiv 2404.07965). The algorithm:
  1. train a reference model on a small clean target-domain corpus; ref_loss[i] = its loss on token i;
  2. forward every token of a batch of the large noisy corpus: excess_loss = train_loss - ref_loss;
  3. backpropagate only the top k of the batch's B*T tokens (global top-k; the paper's k = 0.6 for math):
       L_SLM = sum of the selected tokens' losses / number selected        (k = 1: plain causal LM, CLM)
Ablations (select_by): 'reference' (lowest ref_loss), 'train' (highest train_loss), 'random', and
'oracle', which trains on exactly the tokens the data generator labelled clean (no k: an upper bound).
A control, not a method (select='coin_control', coin_control_mask): SLM's selection with its choice among
the operand bytes, which no model can predict, replaced by a coin that ignores the excess loss, at SLM's
own rate for each operand byte; it reads the task's byte labels, which no real corpus has.
SLM saves no compute: every token is forwarded and the backward runs through the whole network; it
changes which tokens the gradient comes from. Excess-loss selection cannot be precomputed into a static
dataset (train_loss is the current model's); only select_by='reference' can.

The data (data/mathmix): two-digit addition facts `ab+cd=` with held-out operand pairs, mixed with noise
whose every token's kind is known (clean, a bad source's wrong digit, boilerplate, off-domain prose), so
the selection rate per kind and the oracle arm are exact; the metric is held-out exact match.

One run, in three stages (each key's comment names the stages that read it):
    python slm.py --stage=ref                 # the reference model on the clean corpus -> out/slm/ref
    python slm.py --stage=score --noise=0.2   # its loss on every token of that noisy corpus -> the cache
    python slm.py --stage=train --noise=0.2 --select_by=excess --k=0.6 --seed=1   # -> out/slm/noise20/excess_k60_s1
    python slm.py --stage=train --noise=0.4 --select=coin_control --seed=1  # the control: noise40/slm_coin_control_k60_s1
The study (every arm over seeds, the k and noise sweeps, gates, report): python -m studies.slm
The control's study (clm, SLM and the coin control at noise 0.4 over 10 seeds): python -m studies.slm control
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import runs
import train
from configurator import Interrupted, cli, key, require, require_writable, stop_signal_name
from data.loader import (DATA_ROOT, NUMBER, Corpus, DataError, atomic_write_bytes, file_sha256, get_examples,
                         num_examples, read_meta)
from data.mathmix.fewshot import clean_val, exact_match, load_problems
from data.mathmix.prepare import (CLEAN, KINDS, LINE, OPERANDS, ROLES, check_noise_levels, corpus_name, ensure_prepared,
                                  load_kinds, load_roles)
from model import model_vocab_size


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


def coin_control_mask(excess, k, roles, coin_roles=OPERANDS, generator=None):
    """A CONTROL for the SLM study, not a method: it needs to know which tokens carry no information (here the
    task's labels: the operand bytes a b c d of `ab+cd=`, drawn at random), which no real corpus says.
    An operand's excess loss is ~0 for any model that has learned their distribution, so its sign alone
    decides whether top-k takes it: SLM trains on the operands the model happens to under-predict. The
    control takes SLM's own selection and replaces only that choice: each token of a role in coin_roles is
    selected by an independent coin (blind to its excess loss) at the rate SLM selected that role's tokens in
    this micro-batch (so each role gets SLM's number of tokens in expectation). Every other token is selected
    exactly as SLM selects it: SLM's global top-k restricted to them is the top (round(k B T) - the coin roles'
    tokens SLM took) of them by excess loss, ties to the earlier token.
    excess (B, T) = train_loss - ref_loss; roles (B, T) int64, ROLES' indices. -> (mask (B, T), each token's
    coin rate (B, T), 0 off the coin roles)."""
    slm_mask = top_k_mask(excess, k)                                              # (B, T) SLM's selection
    rate, coined = torch.zeros_like(slm_mask), torch.zeros_like(roles, dtype=torch.bool)
    for role in coin_roles:
        mine = roles == role
        rate[mine] = slm_mask[mine].mean() if mine.any() else 0.0                 # SLM's rate for the role, this step
        coined |= mine
    coin = (torch.rand(excess.shape, generator=generator).to(excess.device) < rate).to(slm_mask.dtype)
    return torch.where(coined, coin, slm_mask), rate


def selection_mask(select_by, k, train_loss, ref_loss, kinds, generator=None, select='topk', roles=None):
    """The tokens to train on (B, T): the oracle's are the clean ones, every other arm's the top k;
    select='coin_control' (select_by excess only): coin_control_mask, with roles (B, T) its labels."""
    if select_by == 'oracle':
        return (kinds == CLEAN).float()
    if select == 'coin_control':
        return coin_control_mask(train_loss - ref_loss, k, roles, OPERANDS, generator)[0]
    return top_k_mask(selection_score(select_by, train_loss, ref_loss, generator), k)


def slm_loss(losses, mask):
    """Sum of the selected tokens' losses / number selected (k = 1: the CLM mean)."""
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def stream_positions(ids, T):
    """Stream position of the token each y[b, t] predicts: id + t + 1. ids (B,) -> (B, T) numpy."""
    return np.asarray(ids, dtype=np.int64)[:, None] + 1 + np.arange(T)


# -----------------------------------------------------------------------------
# the objective

ROLE_SUMS = ('tokens', 'selected', 'excess', 'excess_selected')  # summed per byte role since the run began


class SelectiveLM(train.CausalLM):
    """SLM: forward every token, backpropagate the selected ones, count what gets selected per token
    kind and per byte role (with the excess loss). Its val loss is the clean target-domain val loss; each
    eval appends the held-out exact match to <run>/curve.jsonl (the accuracy-vs-tokens curve)."""

    def __init__(self, cfg, paths, cache=None):
        super().__init__(cfg.batch_size)
        self.cfg, self.paths, self.corpus = cfg, paths, paths.corpus(cfg.noise)
        self.generator = torch.Generator().manual_seed(cfg.seed)            # select_by='random', the coin control
        self.counts = torch.zeros(len(KINDS), 2, dtype=torch.float64)      # per kind: seen, selected
        self.role_counts = torch.zeros(len(ROLES), len(ROLE_SUMS), dtype=torch.float64)  # per byte role: ROLE_SUMS
        self.curve_step = -1  # step of the last curve point written (-1: none yet, a fresh run starts the file)
        # ref_loss per stream position: the reference's cache unless one is given, checked here, before the
        # loop reads any data (a stale cache is refused with its fix)
        self.cache = cache
        if cache is None and cfg.ref_mode == 'cached':
            self.cache = load_cache(paths, cfg.noise, cfg.model_dims()['block_size'])

    def setup(self, ctx):
        T, self.rt = ctx.model.config.block_size, ctx.rt
        self.counts, self.role_counts = self.counts.to(ctx.device), self.role_counts.to(ctx.device)
        self.kinds, self.roles = load_kinds(self.corpus), load_roles(self.corpus)
        if self.cfg.ref_mode == 'online':
            self.ref_model = load_reference(self.cfg, self.paths, ctx.device)  # refused unless it fits this run
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

    def labels(self, labels, ids, T, device):
        """kinds.bin's or the roles' label of the token each y[b, t] predicts -> (B, T) int64."""
        return torch.from_numpy(labels[stream_positions(ids, T)].astype(np.int64)).to(device)

    def __call__(self, model, data, ctx):
        x, y, ids = data.next(self.batch_size)
        losses = model(x, y)                                            # (B, T) train_loss
        ref_loss = self.reference_losses(x, y, ids, ctx)                # (B, T)
        kinds, roles = (self.labels(labels, ids, x.size(1), x.device) for labels in (self.kinds, self.roles))  # (B, T)
        mask = selection_mask(self.cfg.select_by, self.cfg.k, losses.detach(), ref_loss, kinds, self.generator,
                              self.cfg.select, roles)
        seen = torch.bincount(kinds.flatten(), minlength=len(KINDS)).double()   # per kind: tokens seen, selected
        kept = torch.bincount(kinds.flatten(), weights=mask.flatten().double(), minlength=len(KINDS))
        self.counts += torch.stack([seen, kept], 1)
        excess = losses.detach() - ref_loss
        per_token = torch.stack([torch.ones_like(mask), mask, excess, excess * mask], -1)  # (B, T, ROLE_SUMS)
        self.role_counts.index_add_(0, roles.flatten(), per_token.flatten(0, 1).double())
        logs = {'selected_frac': mask.mean(), 'excess_selected': slm_loss(excess, mask)}
        return train.Step(slm_loss(losses, mask), len(x), logs)

    def selection_rates(self):
        """Fraction of each kind's tokens selected since the run began (kinds never seen are left out)."""
        c = self.counts.cpu()
        return {name: float(c[i, 1] / c[i, 0]) for i, name in enumerate(KINDS) if c[i, 0] > 0}

    def role_stats(self):
        """Per byte role seen since the run began: its tokens, the fraction selected, the mean excess loss of
        them all and of the selected ones (None when none was)."""
        c = self.role_counts.cpu().tolist()
        return {name: {'tokens': n, 'selected': kept / n, 'excess': excess / n,
                       'excess_selected': excess_kept / kept if kept else None}
                for name, (n, kept, excess, excess_kept) in zip(ROLES, c) if n > 0}

    def evaluate(self, model, ctx):
        val = ctx.evaluate(model, (self.val_x,), self.val_y)
        if self.curve is not None:
            point = {'step': ctx.step, 'tokens': ctx.spent['tokens'], 'val_loss_clean': val,
                     **exact_match(model, self.problems, self.rt), 'selection': self.selection_rates(),
                     'roles': self.role_stats()}
            with open(self.curve, 'a' if self.curve_step >= 0 else 'w') as f:
                f.write(json.dumps(point) + '\n')
        self.curve_step = ctx.step
        return val

    def state_dict(self):  # the loop checkpoints right after an eval: 'step' is that eval's curve point
        return {'generator': self.generator.get_state(), 'counts': self.counts.cpu(), 'step': self.curve_step,
                'role_counts': self.role_counts.cpu()}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])
        self.counts = state['counts'].to(self.counts.device)
        self.role_counts = state.get('role_counts', torch.zeros_like(self.role_counts.cpu())).to(self.role_counts.device)
        self.curve_step = state['step']
        if self.curve is not None:
            runs.trim_log(self.curve, self.curve_step)  # drop points written after the checkpoint


# -----------------------------------------------------------------------------
# the reference losses: one cache per reference and noisy corpus (runs.save_cache's payload and sidecar)

REBUILD = ('rebuild it with `python slm.py --stage=score` (this --out_dir or --ref_ckpt, --noise and --block_size), or use '
           '--ref_mode=online')


def no_reference(ref_ckpt):
    """The refusal of a stage that needs the reference before it exists (--stage=ref writes it where this looks)."""
    if ref_ckpt.name != 'ckpt.pt':  # not a name --stage=ref writes
        return DataError(f'no reference model at {ref_ckpt}: give the checkpoint you have, or train one with `python '
                         f'slm.py --stage=ref --ref_ckpt={ref_ckpt.parent / "ckpt.pt"}` and give that')
    return DataError(f'no reference model at {ref_ckpt}: train it first with `python slm.py --stage=ref` and the same '
                     '--out_dir (and --ref_ckpt, if given) as this command')


def cache_identity(corpus, ref_ckpt, block_size):
    """What a valid cache must agree with: the reference checkpoint, the token stream, tokenizer, shape."""
    if not ref_ckpt.exists():
        raise no_reference(ref_ckpt)
    meta = read_meta(corpus)
    return {'ref_ckpt_sha256': file_sha256(ref_ckpt), 'data_sha256': file_sha256(corpus / 'train.bin'),
            'tokenizer': meta['tokenizer'], 'block_size': block_size, 'n_tokens': meta['counts']['train']['tokens']}


REF_FIX = 'give the reference `python slm.py --stage=ref` trains with this --mathmix_dir and --block_size'


def load_reference(cfg, paths, device):
    """The reference model --ref_ckpt holds (frozen, eval mode), once check_reference finds it fits this run."""
    if not paths.ref_ckpt.exists():
        raise no_reference(paths.ref_ckpt)
    return runs.load_model(paths.ref_ckpt, device, cfg.compile_loss, check=lambda ckpt: check_reference(ckpt, cfg, paths))


def check_reference(ckpt, cfg, paths):
    """DataError (one line) unless the checkpoint can be this run's reference: a GPT over the corpus's vocabulary
    (padded as build_model pads it) with this run's example length, trained, where its checkpoint records it,
    with this tokenizer on this run's clean corpus (the fingerprint train.py saves). A misfit's losses would be
    a cache stale for every arm (the arms check block_size), written over the valid one."""
    meta, args, saved = read_meta(paths.corpus(cfg.noise)), ckpt['model_args'], ckpt.get('config', {})
    identity, T, model_type = ckpt.get('identity'), cfg.model_dims()['block_size'], runs.checkpoint_model_type(ckpt)
    trained_on = identity.get('corpus') if isinstance(identity, dict) else None
    clean = Corpus(paths.ref_data).as_named(trained_on) if trained_on is not None else None
    vocab = {model_vocab_size('gpt', meta['vocab_size'], T, m) for m in (1, cfg.vocab_multiple)}
    dataset = f" ({saved['dataset']})" if 'dataset' in saved else ''
    misfits = ((model_type != 'gpt', f"holds a '{model_type}' model, not a GPT"),
               (saved.get('tokenizer', meta['tokenizer']) != meta['tokenizer'],
                f"was trained with tokenizer {saved.get('tokenizer')!r}, mathmix is {meta['tokenizer']!r}"),
               (trained_on != clean, f'was trained on other data{dataset} than this run\'s clean corpus {paths.ref_data} '
                                     f'(corpus fingerprint {trained_on}, not {clean})'),
               (args['vocab_size'] not in vocab, f"has vocab {args['vocab_size']}, the corpus needs "
                                                 f"{' or '.join(map(str, sorted(vocab)))}"),
               (args['block_size'] != T, f"has block_size {args['block_size']}, this run's --block_size is {T}"))
    for misfit, what in misfits:
        if misfit:
            raise DataError(f'--ref_ckpt={paths.ref_ckpt} {what}: it is not a reference for this run; {REF_FIX}')


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
    """Stage score: one no-grad pass of the reference model over --noise's corpus -> <ref>_ref_loss_noise<P>.bin
    beside the reference <ref>.pt."""
    corpus, rt = paths.corpus(cfg.noise), runs.setup_device(cfg)
    model = load_reference(cfg, paths, rt.device)  # a misfit is refused here, before its cache is touched
    require_writable(paths.ref_losses(cfg.noise))  # beside the reference: found now, not after the scoring pass
    ref_loss = score_stream(model, np.memmap(corpus / 'train.bin', dtype=np.uint16, mode='r'), rt)
    kinds = np.asarray(load_kinds(corpus))
    by_kind = {name: float(ref_loss[1:][kinds[1:] == i].astype(np.float64).mean())
               for i, name in enumerate(KINDS) if (kinds[1:] == i).any()}
    path = paths.ref_losses(cfg.noise)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.save_cache(path, ref_loss, cache_identity(corpus, paths.ref_ckpt, model.config.block_size),
                    {'ref_ckpt': str(paths.ref_ckpt), 'mean_ref_loss': by_kind})
    print(f"wrote {path}: mean ref_loss by kind " + ', '.join(f'{k} {v:.3f}' for k, v in by_kind.items()))


def load_cache(paths, noise, block_size):
    """The ref_loss memmap, or DataError (one line) if it is missing, damaged, edited, truncated or stale."""
    identity = cache_identity(paths.corpus(noise), paths.ref_ckpt, block_size)
    return runs.load_cache(paths.ref_losses(noise), identity, 'reference-loss cache', REBUILD, error=DataError)[0]


# -----------------------------------------------------------------------------
# config: which stage reads which key

SELECT_BY = ('excess', 'reference', 'train', 'random', 'oracle')
SELECT = ('topk', 'coin_control')  # the method's global top-k, or the study's control (coin_control_mask)
# TrainConfig keys the reference run reads too (with ref_budget, ref_lr); for the rest of the recipe
# (optimizer, schedule, arch, ...) it keeps TrainConfig's defaults: TRAIN_KEYS are the arms' only.
REF_KEYS = ('model', 'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'dropout', 'seed', 'init_from', 'overwrite',
            'batch_size', 'budget_unit', 'rst_table', 'eval_interval', 'eval_batches', 'log_interval',
            'sample_tokens', 'device', 'dtype', 'compile', 'compile_loss', 'peak_flops')
NOT_REF = ('out_dir', 'dataset', 'tokenizer', 'model_type', 'budget')  # the stages', and the arms' budget
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(train.TrainConfig) if f.name not in REF_KEYS + NOT_REF)


def default(name, value):
    """TrainConfig's key `name` with slm.py's default, and the valid range TrainConfig declares for it."""
    return dataclasses.field(default=value, metadata=train.TrainConfig.__dataclass_fields__[name].metadata)


@dataclass(frozen=True)
class SLMConfig(train.TrainConfig):
    """Each key's comment starts with the stages that read it. Of TrainConfig's keys, REF_KEYS are read by
    every stage that trains or loads a model, TRAIN_KEYS (lr, optimizer, schedule, arch, ...) only by the
    stage that trains an arm (any other refuses them); --dataset is --mathmix_dir's."""
    ARM_STAGES: ClassVar[tuple] = ('train',)  # the stages that read TRAIN_KEYS
    out_dir: str = default('out_dir', 'out/slm')  # every stage: ref/ (the reference), noise<P>/<arm>_s<seed>/ (the arms)
    n_layer: int = default('n_layer', 2)  # ref, train: small enough for a CPU, deep enough to learn the facts
    n_head: int = default('n_head', 4)  # ref, train
    n_embd: int = default('n_embd', 128)  # ref, train
    block_size: int = default('block_size', 72)  # ref, train: a multiple of 9 (mathmix's line): 8 lines per window
    batch_size: int = default('batch_size', 8)  # ref, train: the facts formed sooner than at 16
    budget_unit: str = default('budget_unit', 'tokens')  # ref, train: arms are compared at equal training tokens
    budget: float = default('budget', 1e6)  # train: tokens per arm (the reference's: ref_budget)
    eval_interval: int = default('eval_interval', 80)  # ref, train: steps between accuracy-curve points
    eval_batches: int = default('eval_batches', 8)  # ref, train: the clean val set: eval_batches x batch_size examples
    sample_tokens: int = default('sample_tokens', 0)  # ref, train
    stage: str = key('train', ('ref', 'score', 'train'))  # ref (the reference), score (the cache), train (one arm)
    k: float = key(0.6, '(0,1]')    # train: fraction of the batch's tokens trained on (paper: 0.6 math)
    select_by: str = key('excess', SELECT_BY)  # train: excess (Rho-1), reference (low ref_loss), train (high loss), random, oracle
    select: str = key('topk', SELECT)  # train: topk (Rho-1), or coin_control: a CONTROL, not a method
                                       # (it reads the task's byte labels): each operand byte gets a coin at
                                       # SLM's rate for it, blind to the excess (coin_control_mask); with
                                       # select_by=excess, k < 1
    noise: float = key(0.2, '[0,1)')  # score, train: which noisy corpus (the fraction of noise lines)
    ref_mode: str = key('cached', ('cached', 'online'))  # train: cached (stage score's) or online (a reference forward per step)
    ref_budget: float = key(2e6, '>0')  # ref: the reference model's budget (budget_unit), on the clean corpus
    ref_lr: float = key(3e-3, '>0')  # ref: its peak lr (the arms train at the lower --lr: SLM failed to learn at this one)
    ref_ckpt: str = ''              # ref (writes its folder), score, train: '' = <out_dir>/ref/ckpt.pt
    ref_sha256: str = ''            # train: the sha256 ref_ckpt must have ('' = any; a study pins its reference)
    run_dir: str = ''               # train: the arm's folder; '' = <out_dir>/noise<P>/<arm>_s<seed>
    mathmix_dir: str = ''           # every stage: '' = data/mathmix (prepared on first use)

    def __post_init__(self):
        super().__post_init__()
        require(self.tokenizer == 'byte', "--tokenizer must be 'byte' (mathmix is byte-level)")
        require(self.model_type == 'gpt', '--model_type must be gpt (SLM selects next-token losses)')
        require(not self.branch_budgets, '--branch_budgets: slm.py runs no WSD branches')
        for name in ('ref_ckpt', 'run_dir', 'mathmix_dir'):  # '' is the default; ' ' would name a stray file or folder
            require(getattr(self, name) == '' or getattr(self, name).strip() != '', f"--{name} is blank: give a path, or ''")
        require(not (self.ref_ckpt and Path(self.ref_ckpt).is_dir()),
                f'--ref_ckpt={self.ref_ckpt} is a folder: give the checkpoint file (e.g. {Path(self.ref_ckpt) / "ckpt.pt"})')
        require(self.stage != 'ref' or not self.ref_ckpt or Path(self.ref_ckpt).name == 'ckpt.pt',  # the loop's name
                f'--stage=ref trains into a folder\'s ckpt.pt: give --ref_ckpt={Path(self.ref_ckpt).parent / "ckpt.pt"}')
        T = self.model_dims()['block_size']
        require(T % LINE == 0 and T >= 2 * LINE, f'--block_size must be a multiple of {LINE} (a mathmix line), >= {2 * LINE}')
        require(self.select == 'topk' or (self.select_by == 'excess' and self.k < 1),
                f'--select={self.select} is a control of SLM: give it with --select_by=excess and --k < 1')
        base = self.key_defaults()
        stray = [f'--{key}' for key in TRAIN_KEYS if getattr(self, key) != base[key]]
        require(self.stage in self.ARM_STAGES or not stray, f"{', '.join(stray)}: read only by the stages that train "
                f"arms ({', '.join(self.ARM_STAGES)}), not --stage={self.stage}")
        self.check_sizes()

    def check_sizes(self):
        """Counts against what they imply, before anything is built."""
        check_noise_levels('noise', (self.noise,))
        check_k('k', self.k, self.batch_size * self.model_dims()['block_size'])

    def key_defaults(self):
        """What each key holds when it is not given."""
        return {f.name: f.default for f in dataclasses.fields(self)}


def check_k(name, k, n_tokens):
    """top_k_mask keeps round(k x n_tokens) tokens of a micro-batch: refuse a k that keeps none."""
    require(round(k * n_tokens) >= 1, f'--{name}={k:g} selects round({k:g} x {n_tokens}) = 0 of a micro-batch\'s {n_tokens} '
                                      f'tokens (--batch_size x --block_size): give --{name} >= {1 / n_tokens:.4g} '
                                      f'(1/{n_tokens}), the smallest that selects one')


def arm_name(select_by, k, select='topk'):
    if select == 'coin_control':
        return f'slm_coin_control_k{round(100 * k)}'
    return 'oracle' if select_by == 'oracle' else 'clm' if k == 1 else f'{select_by}_k{round(100 * k)}'


@dataclass(frozen=True)
class Paths:
    root: Path        # out_dir: ref/, noise<P>/<arm>_s<seed>/
    ref_ckpt: Path
    data: Path        # mathmix: ref/byte, noise<P>/byte, eval/eval.jsonl
    ref_data: Path    # the clean corpus (its val split: clean target-domain val text)
    eval_file: Path   # the held-out problems

    def corpus(self, noise):  # train.bin, kinds.bin
        return self.data / corpus_name(noise) / 'byte'

    def ref_losses(self, noise):  # the reference's losses (and sidecar .json) beside it, named by it: in the corpus
        return self.ref_ckpt.parent / f'{self.ref_ckpt.stem}_ref_loss_{corpus_name(noise)}.bin'  # folder, or by the
        # folder alone, two references' scores replaced each other

    def run_dir(self, cfg):
        return Path(cfg.run_dir) if cfg.run_dir else \
            self.root / corpus_name(cfg.noise) / f'{arm_name(cfg.select_by, cfg.k, cfg.select)}_s{cfg.seed}'


def get_paths(cfg):
    root, data = Path(cfg.out_dir), Path(cfg.mathmix_dir) if cfg.mathmix_dir else DATA_ROOT / 'mathmix'
    return Paths(root, Path(cfg.ref_ckpt) if cfg.ref_ckpt else root / 'ref' / 'ckpt.pt', data, data / 'ref' / 'byte',
                 data / 'eval' / 'eval.jsonl')


# -----------------------------------------------------------------------------
# stages

POINT_KEYS = {'tokens': NUMBER, 'accuracy': NUMBER}  # what a curve point needs


def read_curve(path):
    """A run's curve.jsonl: its eval points (a line that does not parse is dropped, as in any log), or
    DataError (one line) when none is left."""
    points = [p for p in runs.read_log(Path(path)) if all(isinstance(p.get(k), t) for k, t in POINT_KEYS.items())]
    if not points:
        raise DataError(f'{path} is missing or holds no eval point (tokens, accuracy): train its run again')
    return points


def ref_config(cfg, paths):
    """The reference run: plain causal LM on the clean corpus (REF_KEYS, ref_*), with the shared loop."""
    return train.TrainConfig(**{key: getattr(cfg, key) for key in REF_KEYS}, budget=cfg.ref_budget, lr=cfg.ref_lr,
                             out_dir=str(paths.ref_ckpt.parent), dataset=str(paths.ref_data))


def stage_ref(cfg, paths):
    return train.train(ref_config(cfg, paths))


def stage_train(cfg, paths):
    """One arm: cfg's selection at its noise and seed, trained into its folder (--init_from=resume continues
    a killed one) -> its eval.json: the final curve point (the eval at the end of the budget), the run's
    config and the reference's checksum (what the arm's numbers depend on)."""
    if not paths.ref_ckpt.exists():
        raise no_reference(paths.ref_ckpt)
    ref_sha = file_sha256(paths.ref_ckpt)
    if cfg.ref_sha256 not in ('', ref_sha):
        raise DataError(f'{paths.ref_ckpt} is not the reference --ref_sha256 names (its sha256 is {ref_sha}): '
                        'give that checkpoint, or another --ref_sha256')
    folder = paths.run_dir(cfg)
    run = dataclasses.replace(cfg, out_dir=str(folder), dataset=str(paths.corpus(cfg.noise)))
    if train.train(run, SelectiveLM(run, paths))['interrupted']:
        raise Interrupted(f'{folder} stopped by {stop_signal_name()}, its checkpoint saved: rerun the command with '
                          '--init_from=resume to continue it (exit 130 / 143: not finished, no eval.json)')
    same = {**dataclasses.asdict(run), 'ref_ckpt_sha256': ref_sha}
    arm = arm_name(cfg.select_by, cfg.k, cfg.select)
    out = {'run': f'{folder.parent.name}/{folder.name}', 'noise': cfg.noise, 'arm': arm, 'k': cfg.k, 'seed': cfg.seed,
           **read_curve(folder / 'curve.jsonl')[-1], 'run_config': json.loads(json.dumps(same))}
    atomic_write_bytes(folder / 'eval.json', json.dumps(out, indent=1).encode())
    print(f"{out['run']}: exact match {out['accuracy']:.3f} (trap {out['trap_accuracy']:.3f}), "
          f"clean val loss {out['val_loss_clean']:.4f}, selected {out['selection']}")
    return out


STAGE_FNS = {'ref': stage_ref, 'score': build_cache, 'train': stage_train}


def main(cfg):
    ensure_prepared(cfg.mathmix_dir, [cfg.noise])
    return STAGE_FNS[cfg.stage](cfg, get_paths(cfg))


if __name__ == '__main__':
    cli(main, SLMConfig)
