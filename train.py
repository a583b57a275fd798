"""The one training loop: baseline, optimizer choice, budgets, eval, checkpoints, resume, DDP.

    python train.py                                        # small GPT on the embedded stdlib corpus, CPU
    python train.py config/gpt2_124m.py --compile=True     # a config file, then overrides
    python train.py config/t5_lite.py                      # T5-lite on span corruption, same loop and budget
    torchrun --standalone --nproc_per_node=2 train.py      # DDP (gloo on CPU, nccl on GPU)

Methods plug into this loop through named hooks; they never copy it:
  objective(model, data, ctx) -> Step   the loss of one micro-batch (CausalLM is the baseline's own)
  objective.setup(ctx)                  once: ask the RunContext for what the method needs (a subset of
                                        the examples, parameters of its own, costs paid before the run)
  objective.evaluate(model, ctx)        optional: the method's own val loss
  optimizer hooks, every k steps        Sophia-G's Hessian estimate (optim_sophia.HessianHook)
  arch.before_step(model, optimizer, p) the budget-progress hook (arch.py): stacking doubles, dropping resamples
  optimizer.eval() / .train()           optional: the point evaluated, saved and sampled (schedule-free's x)
                                        and the point trained (its y); see evaluation_point
The loop charges the trained examples' forward+backward, the optimizer update and the hooks' passes
(methods charge their extra forwards through ctx), and stops when the budget is spent, which is
exactly when the learning rate reaches min_lr (a schedule-free optimizer's stays at its peak).
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import budget as budget_lib
from arch import ARCHS, build_arch
from configurator import (Interrupted, UserError, check_distinct, check_ranges, cli, key, require, signals_between_steps,
                          stop_signal_name, STOPPED)
from data.loader import (MAX_SEED, Batches, Corpus, DataError, atomic_write_bytes, data_dir, file_as_dataset,
                         get_examples, get_tokenizer, is_count, prepare_command, val_ids)
from data.spans import SpanVocab, raw_length_for, span_corrupt, t5_lengths
from model import MODELS, PRESETS, evaluate, sample_text
from runs import (build_model, check_resume_config, check_resume_method, format_seconds, load_checkpoint, locked_folders,
                  locked_out_dir, method_name, model_from_checkpoint, prepare_out_dir, records_config, refused_if_damaged,
                  run_finished, run_info, save_checkpoint, setup_device, start_wandb, trim_log)


@dataclass(frozen=True)
class TrainConfig:
    # run
    out_dir: str = key('out/default', 'path')  # checkpoint, log.jsonl and config.json go here
    label: str = ''                  # the method's name in the lab's compare tables; '' = derived from the config
    init_from: str = key('scratch', 'path')  # 'scratch', 'resume' (out_dir/ckpt.pt), or a ckpt.pt to start from
    overwrite: bool = False          # allow a scratch run over an out_dir that holds a run (calibrate.py: over a cost table)
    seed: int = key(1337, f'[0,{MAX_SEED}]')  # fixes the initialisation and the data order (paired seeds compare methods)
    # data
    dataset: str = key('stdlib', 'path')  # a folder under data/ (prepared on first use for stdlib) or a path
    tokenizer: str = key('byte', 'path')  # 'byte' or a tiktoken encoding name
    batch_size: int = key(32, '>0')  # examples per micro-batch
    grad_accum: int = key(1, '>0')   # micro-batches per optimizer step
    # model
    model_type: str = key('gpt', tuple(MODELS))  # 'gpt' (next-token loss) or 't5' (T5-lite on span corruption)
    model: str = key('small', tuple(PRESETS))  # a size preset in model.PRESETS (GPT and T5-lite)
    n_layer: int = key(0, '>=0')     # 0 = the preset's
    n_head: int = key(0, '>=0')      # 0 = the preset's
    n_embd: int = key(0, '>=0')      # 0 = the preset's
    block_size: int = key(0, '>=0')  # 0 = the preset's
    dropout: float = key(0.0, '[0,1)')  # in attention and MLP while training (0 for short budgets, as nanoGPT)
    bias: bool = True                # biases in Linear and LayerNorm, as GPT-2 (False: none, nanoGPT's option)
    vocab_multiple: int = key(64, '>0')  # GPT's vocabulary padded up to a multiple (GPT-2's 50257 -> 50304, as nanoGPT)
    # dynamic architecture (No Train No Gain section 3.1)
    arch: str = key('full', tuple(ARCHS))  # full, stack (layer stacking) or drop (progressive layer dropping)
    stack_init_layers: int = key(0, '>=0')  # stack: blocks active at the start; 0 = n_layer // 4
    stack_fracs: tuple = key((0.125, 0.3), '(0,1)')  # stack: budget fractions at which the active depth doubles
    stack_optim: str = key('fresh_new', ('fresh_new', 'reset', 'keep'))  # stack: after doubling, new blocks' state empty / all reset / kept
    theta_bar: float = key(0.5, '(0,1]')  # drop: the keep probability theta(t) decays to this
    gamma_f: float = key(100.0, '>=0')  # drop: decay speed of theta(t) (100 BERT-like, 20 for T5)
    # optimizer
    optimizer: str = key('adamw', ('adamw', 'lion', 'sophiag', 'muon', 'sfadamw'))  # the optimizer (train.OPTIMIZERS)
    lr: float = key(2e-3, '>0')      # peak learning rate
    min_lr: float = key(0.0, '>=0')  # reached exactly when the budget is spent
    weight_decay: float = key(0.1, '>=0')  # on matrices only
    beta1: float = key(0.9, '[0,1)')
    beta2: float = key(0.95, '[0,1)')
    grad_clip: float = key(1.0, '>=0')  # 0 = off
    rho: float = key(0.04, '>0')     # Sophia-G: clipping scale of the preconditioned step
    hess_interval: int = key(10, '>0')  # Sophia-G: Hessian estimate every k steps
    free_hessian: bool = False       # Sophia-G: do not charge Hessian steps (the paper's ablation)
    muon_lr: float = key(0.02, '>0')  # muon: the lr of the hidden matrices (AdamW's parts use --lr); scheduled alike
    muon_momentum: float = key(0.95, '[0,1)')  # muon: mu of the (Nesterov) momentum
    muon_scale: str = key('original', ('original', 'match_rms_adamw'))  # muon: step scale by shape (optim_muon.SCALES)
    muon_ns_dtype: str = key('auto', ('auto', 'bfloat16', 'float32'))  # muon: Newton-Schulz dtype; auto: bfloat16 on CUDA, float32 on CPU
    # budget and schedule
    budget_unit: str = key('rst', budget_lib.UNITS)  # rst, tokens, iters, flops or wall
    budget: float = key(180.0, '>0')  # in budget_unit
    schedule: str = key('cosine', tuple(budget_lib.SCHEDULES))  # cosine, linear, onecycle, wsd, rex (see budget.py)
    warmup_frac: float = key(0.02, '[0,1)')  # of the budget
    warmup_units: float = key(0.0, '>=0')  # > 0: warm-up in budget units instead (the same for every budget)
    cooldown_frac: float = key(0.2, '(0,1]')  # wsd: the cooldown's share of the budget
    cooldown_shape: str = key('1-sqrt', ('1-sqrt', 'linear'))  # wsd: '1-sqrt' or 'linear'
    branch_budgets: tuple = key((), '>0')  # wsd: multiples of --budget, e.g. (1, 2, 4): one trunk, a cooldown branch each
    rst_table: str = ''              # '' = config/rst/<shape>.json
    rst_repeats: int = key(1, '>0')  # calibrate.py: measure the table N times (median; each entry's CV saved)
    rst_add: tuple = ()              # calibrate.py: add only these optimizers to the existing table (budget.add_entries)
    # eval, logging, checkpoints, sampling
    eval_interval: int = key(250, '>0')  # optimizer steps between evals (and checkpoints)
    eval_batches: int = key(16, '>0')  # fixed val set: eval_batches x batch_size examples
    log_interval: int = key(25, '>0')  # optimizer steps between progress lines (and log.jsonl train records)
    sample_tokens: int = key(300, '>=0')  # generated at the end (and by --sample_only); 0 = none
    sample_only: bool = False        # print samples from --init_from's checkpoint (resume = out_dir's) and exit
    start: str = '\ndef '            # the prompt samples continue (T5: the encoder's input); FILE:path reads it from a file
    temperature: float = key(0.8, '>=0')  # sampling: 0 = greedy, < 1 sharper, > 1 more random
    top_k: int = key(40, '>=0')      # sampling: draw from the k most likely tokens; 0 = from all
    num_samples: int = key(1, '>0')  # samples printed by --sample_only
    wandb_log: bool = False          # also log log.jsonl's records to Weights & Biases (pip install wandb)
    wandb_project: str = key('efficient-lm', 'path')  # wandb: project
    wandb_run_name: str = ''         # wandb: run name; '' = out_dir
    # system
    device: str = key('auto', 'path')  # auto, cpu, cuda, cuda:1, mps
    dtype: str = key('auto', ('auto', 'float32', 'bfloat16'))  # auto: bf16 on GPU, else float32 (no float16: with no
                                     # loss scaling its gradients underflow, the fused loss's 1/N-scaled ones first)
    compile: bool = False            # torch.compile the whole model
    compile_loss: bool = True        # torch.compile the per-token loss kernels
    peak_flops: float = key(0.0, '>=0')  # for MFU; 0 = the device's (a measured matmul peak on CPU)
    skip_nonfinite: bool = False     # skip (and count) steps whose loss is nan/inf instead of stopping

    def __post_init__(self):
        check_ranges(self)
        require(self.init_from in ('scratch', 'resume') or self.init_from.endswith('.pt'),
                f"--init_from must be 'scratch', 'resume' or a checkpoint path (.pt), got '{self.init_from}'")
        dims = self.model_dims()
        require(self.model_type != 't5' or dims['block_size'] >= 3, '--block_size (the encoder input length) must be >= 3 for T5')
        require(dims['n_embd'] % dims['n_head'] == 0, f"--n_head={dims['n_head']} must divide --n_embd={dims['n_embd']}")
        require(self.min_lr <= self.lr, f'--min_lr ({self.min_lr}) must not exceed --lr ({self.lr})')
        # 2.5 steps ran 3; a budget below one step is refused by Trainer._check_budget_fits_a_step, with the least
        require(self.budget_unit != 'iters' or self.budget < 1 or float(self.budget).is_integer(),
                f'--budget={self.budget:g} iters is not a whole number of steps: give {math.floor(self.budget):g} or '
                f'{math.ceil(self.budget):g}')
        if self.start.startswith('FILE:'):  # read now: an unreadable prompt fails before the run, not after it
            prompt = Path(self.start[5:])
            require(prompt.is_file(), f"--start={self.start}: {'not a regular file' if prompt.exists() else 'no file'} at "
                                      f'{prompt} (FILE:path reads the prompt from a text file)')
            prompt_text(self.start)
        require(self.warmup_units < self.budget, f'--warmup_units must be below --budget, got {self.warmup_units}')
        if self.optimizer in SCHEDULE_FREE:  # its lr stays at the peak: one run passes through every smaller budget
            require(self.warmup_units > 0 or self.warmup_frac == 0, f'--optimizer={self.optimizer} needs a warm-up the same '
                    f'for every budget: give --warmup_units=N in budget units (e.g. {0.02 * self.budget:g}, 2% of this one), '
                    f'or --warmup_frac=0 for none')
            require(self.schedule != 'onecycle', f'--optimizer={self.optimizer} decays nothing: --schedule=onecycle would make '
                                                 f'its warm-up half the budget')
        require(not self.branch_budgets or self.schedule == 'wsd', '--branch_budgets needs --schedule=wsd')
        if self.branch_budgets:  # a budget given twice: the trunk and its branch would share one folder
            check_distinct('branch_budgets', self.branch_budgets, '(1, 2, 4)')
        if self.schedule == 'wsd':  # warm-up and cool-down fit in the run (the smallest branch's: the warm-up is absolute)
            warmup = (self.warmup_units or self.warmup_frac * self.budget) / (self.budget * min(self.branch_budgets, default=1))
            require(warmup + self.cooldown_frac <= 1 + 1e-9, f'wsd: the warm-up ({warmup:g} of the budget) plus --cooldown_frac '
                    f'({self.cooldown_frac:g}) must be <= 1: lower --warmup_frac or --cooldown_frac')
        require(all(a < b for a, b in zip(self.stack_fracs, self.stack_fracs[1:])),
                f'--stack_fracs must increase strictly, got {self.stack_fracs}')
        require(self.stack_init_layers <= dims['n_layer'], f"--stack_init_layers must be <= n_layer ({dims['n_layer']})")
        require(self.start != '', "--start must be a non-empty prompt for the samples to continue, e.g. --start='\\ndef '")

    def model_dims(self):
        preset = PRESETS[self.model] if self.model in PRESETS else PRESETS['small']
        return {k: getattr(self, k) or preset[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size')}


class NonFiniteLoss(UserError):
    pass


# -----------------------------------------------------------------------------
# what a method plugs in: an objective, and the run context it talks to the loop through

@dataclass
class Step:
    """What an objective returns for one micro-batch."""
    loss: torch.Tensor       # scalar to backpropagate
    examples: int            # examples forwarded+backwarded (charged as training)
    logs: dict = dataclasses.field(default_factory=dict)  # floats or 0-d tensors, averaged per log line


class RunContext:
    """A method's view of the run: facts it may read, and the few things it may ask of the loop.

    Requests made in `setup` (restrict_examples, add_params, charge_before_start, log) are applied by the
    loop when it builds the data stream, the optimizer and the budget, before a resume restores their
    saved state: so the order of setup and resume never matters, and no method assigns loop state.
    """

    def __init__(self, trainer):
        self._trainer = trainer
        self.cfg, self.rt, self.device = trainer.cfg, trainer.rt, trainer.rt.device
        self.out_dir, self.corpus, self.model = trainer.out_dir, trainer.corpus, trainer.model
        self.examples, self.param_groups, self.charges, self.records = None, [], {}, []

    # read, once the loop runs: where the run is
    @property
    def step(self):
        return self._trainer.iter_num

    @property
    def spent(self):
        return dict(self._trainer.budget.spent)

    @property
    def progress(self):
        return self._trainer.budget.progress

    # ask, in setup
    def restrict_examples(self, examples):
        """Train only on these example indices (k; the example's id is k * block_size)."""
        self.examples = examples

    def add_params(self, params, weight_decay=0.0):
        """Train these parameters too (a head the method owns; saved in its state_dict)."""
        self.param_groups.append({'params': list(params), 'weight_decay': weight_decay})

    def freeze_model(self):
        """Train only the parameters added with add_params: the model is a frozen backbone."""
        self.model.requires_grad_(False)  # build_optimizer takes only parameters that require grad

    def charge_before_start(self, spent):
        """Costs paid before the run (an IL model): added to a fresh run's budget (a resumed run's has them)."""
        for unit, value in spent.items():
            self.charges[unit] = self.charges.get(unit, 0.0) + (value or 0.0)

    # ask, any time
    def log(self, record):
        """A log.jsonl record; in setup it is written only by a fresh run (a resumed run's log has it)."""
        if self._trainer.building:
            self.records.append(record)
        else:
            self._trainer.log(record)

    def charge_forward(self, n_examples, n_layers):
        """A forward-only pass of n_examples per rank (scoring, a reference model) at n_layers blocks."""
        self._trainer.budget.charge_forward(n_examples * self.rt.world_size, n_layers)

    def evaluate(self, model, inputs, targets):
        """Mean per-token loss of model on fixed examples (every block), in eval mode."""
        return evaluate(model, inputs, targets, self.cfg.batch_size, self.rt)


class CausalLM:
    """The baseline objective: mean next-token loss over every token of a micro-batch.

    A method's objective subclasses it and may override:
      __call__(model, data, ctx) -> Step   the loss of one micro-batch (data.next(n) -> x, y, ids)
      setup(ctx)                           once, before the loop: ask the RunContext for what it needs
      evaluate(model, ctx) -> float        the method's own val loss (lower is better); None = the loop's
      val_batch(x, y), hessian_batch(data) the model's (inputs, targets) for val and Sophia's estimate
      state_dict() / load_state_dict()     whatever a resume needs to continue exactly
    """
    evaluate = None

    def __init__(self, batch_size):
        self.batch_size = batch_size

    def setup(self, ctx):
        pass

    def __call__(self, model, data, ctx):
        x, y, _ = data.next(self.batch_size)
        return Step(model(x, y, weight=1 / y.numel()), len(x))  # the mean, fused: gradients made in the forward

    def val_batch(self, x, y):
        return (x,), y

    def hessian_batch(self, data):
        """A fresh micro-batch for Sophia's estimate: (model inputs, targets); labels are sampled."""
        return self.val_batch(*data.next(self.batch_size)[:2])

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class SpanCorruption(CausalLM):
    """T5's objective (data/spans.py): an example is a raw chunk (x and y's last token) that span
    corruption turns into encoder input, decoder input and targets; the loss is the mean over the
    targets. The val set is corrupted once with a fixed seed; the training corruption's generator is
    checkpointed, so a resumed run corrupts exactly as an uninterrupted one."""

    def __init__(self, batch_size, seed, vocab):
        super().__init__(batch_size)
        self.generator, self.vocab = torch.Generator().manual_seed(seed), vocab

    def corrupt(self, x, y, generator):
        enc_in, dec_in, targets = span_corrupt(torch.cat([x, y[:, -1:]], dim=1), generator, self.vocab)
        return (enc_in, dec_in), targets

    def __call__(self, model, data, ctx):
        x, y, _ = data.next(self.batch_size)
        inputs, targets = self.corrupt(x, y, self.generator)
        return Step(model(*inputs, targets, weight=1 / targets.numel()), len(x))

    def val_batch(self, x, y):
        return self.corrupt(x, y, torch.Generator().manual_seed(0))

    def hessian_batch(self, data):
        x, y, _ = data.next(self.batch_size)
        return self.corrupt(x, y, self.generator)

    def state_dict(self):
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])


def build_objective(cfg, corpus, model):
    """The baseline objective of a model type: next-token loss for GPT, span corruption for T5."""
    if cfg.model_type == 't5':
        return SpanCorruption(cfg.batch_size, cfg.seed, SpanVocab(corpus.vocab_size, model.config.vocab_size))
    return CausalLM(cfg.batch_size)


# -----------------------------------------------------------------------------
# setup: data, model, optimizer

def load_corpus(cfg):
    path = data_dir(cfg.dataset, cfg.tokenizer)
    if not (path / 'meta.json').exists():
        if Path(cfg.dataset).is_file():
            raise DataError(file_as_dataset(cfg.dataset, cfg.tokenizer))
        if cfg.dataset != 'stdlib':
            raise DataError(f'no prepared data in {path}: run `{prepare_command(cfg.dataset, cfg.tokenizer)}`')
        from data.stdlib.prepare import PrepareConfig, prepare
        print(f'preparing the embedded stdlib corpus in {path} (once)')
        prepare(PrepareConfig(tokenizer=cfg.tokenizer, out_dir=str(path)), if_missing=True)  # a parallel run may be at it
    corpus = Corpus(path)
    if corpus.meta['tokenizer'] != cfg.tokenizer:  # a folder given as --dataset: its config.json would name another
        raise DataError(f"--tokenizer={cfg.tokenizer} but {path} was prepared with the {corpus.meta['tokenizer']!r} "
                        f"tokenizer: give --tokenizer={corpus.meta['tokenizer']}, or a corpus prepared with {cfg.tokenizer}")
    return corpus


def example_length(cfg, model):
    """The block_size of the loader's examples (each holds block_size + 1 tokens): GPT's context, or
    T5's raw chunk minus one, which span corruption shortens to the encoder's block_size."""
    T = model.config.block_size
    return raw_length_for(T) - 1 if cfg.model_type == 't5' else T


def targets_per_example(cfg, model):
    """Tokens whose loss an example adds to the mean: GPT's block_size, T5's target length."""
    T = model.config.block_size
    return t5_lengths(raw_length_for(T))[1] if cfg.model_type == 't5' else T


def data_keys(cfg):
    """The run's data keys as a command line gives them (calibrate's hint: they decide the vocabulary)."""
    return ' '.join(f'--{k}={getattr(cfg, k)}' for k in ('dataset', 'tokenizer') if getattr(cfg, k) != TrainConfig.__dataclass_fields__[k].default)


def run_shape_key(cfg, model):
    c = model.config
    return budget_lib.shape_key(cfg.model_type, c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, cfg.batch_size)


def adamw(cfg, groups, betas, bs, device):
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type == 'cuda'), []


def lion(cfg, groups, betas, bs, device):
    from optim_lion import Lion
    return Lion(groups, lr=cfg.lr, betas=betas), []


def sophiag(cfg, groups, betas, bs, device):
    from optim_sophia import HessianHook, SophiaG
    return SophiaG(groups, lr=cfg.lr, betas=betas, rho=cfg.rho, bs=bs), [HessianHook(cfg.hess_interval, not cfg.free_hessian)]


def muon(cfg, groups, betas, bs, device):
    """Muon on the groups marked 'muon' (at --muon_lr, scaled by the schedule as --lr is), AdamW on the rest."""
    from optim_muon import MuonWithAdamW
    groups = [{**g, 'lr_scale': cfg.muon_lr / cfg.lr} if g.get('muon') else g for g in groups]
    ns_dtype = cfg.muon_ns_dtype if cfg.muon_ns_dtype != 'auto' else 'bfloat16' if device.type == 'cuda' else 'float32'
    return MuonWithAdamW(groups, lr=cfg.lr, muon_lr=cfg.muon_lr, betas=betas, momentum=cfg.muon_momentum,
                         scale=cfg.muon_scale, ns_dtype=getattr(torch, ns_dtype)), []  # float32 on CPU: optim_muon says why


def sfadamw(cfg, groups, betas, bs, device):
    """Schedule-free AdamW at the loop's lr: its warm-up in budget units, then --lr to the end (SCHEDULE_FREE);
    the optimizer's own warm-up, counted in steps, stays off."""
    from optim_sfadamw import SFAdamW
    return SFAdamW(groups, lr=cfg.lr, betas=betas), []


OPTIMIZERS = {'adamw': adamw, 'lion': lion, 'sophiag': sophiag, 'muon': muon, 'sfadamw': sfadamw}  # name -> (optimizer, its every-k-steps hooks)
SCHEDULE_FREE = ('sfadamw',)  # their average does the decay's work: the lr stays at --lr after an absolute warm-up


@contextlib.contextmanager
def evaluation_point(optimizer):
    """The weights at the point the optimizer is evaluated at, for the block: a schedule-free optimizer trains at
    y but its answer is the average x, so its eval() moves the parameters to x and train() moves them back, exactly
    (optim_sfadamw). Every val loss, checkpoint and sample goes through here; other optimizers have no eval()."""
    if not hasattr(optimizer, 'eval'):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def training_point(optimizer):
    """The weights at the point the optimizer trains at, before the first step: a resumed checkpoint holds x."""
    if hasattr(optimizer, 'train'):
        optimizer.train()


def hidden_matrices(model):
    """The ids of the 2-D weights between input and output (Muon's): every matrix but the embeddings' (GPT's
    wte and wpe; T5-lite's wte and relative position biases) and the head's (lm_head, tied to wte in GPT)."""
    ends = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    ends |= {id(model.lm_head.weight)} if hasattr(model, 'lm_head') else set()
    return {id(p) for p in model.parameters() if p.dim() == 2 and id(p) not in ends}


def build_optimizer(cfg, model, bs, extra_groups=(), name=None):
    """The optimizer --optimizer names and its step hooks, with weight decay on matrices only (not biases
    or norms); extra_groups: parameters a method added (RunContext.add_params). bs: tokens whose loss
    one optimizer step averages (Sophia-G's `bs`). For Muon the matrices split in two groups: the hidden
    ones, marked 'muon', and the embeddings and head, which stay with AdamW."""
    name = name or cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2]
    groups = [{'params': matrices, 'weight_decay': cfg.weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}, *extra_groups]
    if name == 'muon':
        hidden = hidden_matrices(model)
        groups[:1] = [{'params': [p for p in matrices if id(p) in hidden], 'weight_decay': cfg.weight_decay, 'muon': True},
                      {'params': [p for p in matrices if id(p) not in hidden], 'weight_decay': cfg.weight_decay}]
    device = next(model.parameters()).device
    return OPTIMIZERS[name](cfg, groups, (cfg.beta1, cfg.beta2), bs, device)


def agreed_stop(rt, stop):
    """Whether the run stops before this step. Under DDP a signal may reach one rank only (or one a step
    early): the ranks agree at the step boundary (the largest signal number any rank holds), so every rank
    stops at the same step, and saves together, instead of one leaving while another waits in an all-reduce.
    A rank stopped by another's signal records it as its own: its exit status says stopped too."""
    held = stop[0] if stop else 0
    signum = int(rt.reduce(float(held), dist.ReduceOp.MAX))
    if signum and not stop:
        stop.append(signum)
        STOPPED.append(signum)
    return bool(signum)


def sampling_tokenizer(cfg, corpus):
    """The corpus's tokenizer, which only the final sample needs (training reads token ids): loaded at the
    start, so a machine that cannot load it (gpt2 offline) learns so before training, not after; None
    without a sample, so such a machine trains."""
    if not cfg.sample_tokens:
        return None
    try:
        return get_tokenizer(corpus.meta['tokenizer'])
    except DataError as e:
        raise DataError(f'{e}; or train without the final sample: --sample_tokens=0') from None


def compiled(model, arch):
    """--compile: the whole model as one graph; under layer dropping, each block on its own and the loop
    over the active blocks in Python. A whole-model graph is specialised to its set of active blocks, and
    dropping draws a new set every step: dynamo recompiles per set up to its limit (8), then silently runs
    the model eagerly. One block graph serves every block and every set (stacking's few sets fit the limit)."""
    if arch != 'drop':
        return torch.compile(model)
    for block in model.blocks():
        block.compile()
    return model


class DataSource:
    """The training examples of this rank, moved to the device (ids stay on the CPU)."""

    def __init__(self, batches, device):
        self.batches, self.device = batches, device

    def next(self, n):
        x, y, ids = self.batches.next(n)
        if self.device.type == 'cuda':
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True), ids
        return x.to(self.device), y.to(self.device), ids


# -----------------------------------------------------------------------------
# the loop

class Trainer:
    """Holds one run's pieces; `run()` is the loop. Methods reach it only through the objective's hooks
    and the RunContext. branch_points: [(spent, path, budget)]: where to save WSD cooldown branch checkpoints."""

    def __init__(self, cfg, objective=None, branch_points=()):
        self.cfg, self.rt = cfg, setup_device(cfg)
        torch.manual_seed(cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        prepare_out_dir(cfg, self.out_dir, self.rt.master)
        saved = load_checkpoint(self.out_dir / 'ckpt.pt') if cfg.init_from == 'resume' else None
        if saved is not None:
            check_resume_config(cfg, saved, self.out_dir / 'ckpt.pt')
        self.corpus = load_corpus(cfg)
        self.tokenizer = sampling_tokenizer(cfg, self.corpus)
        self.model = build_model(cfg, self.corpus.vocab_size, self.rt.device, saved)
        if notice := shape_notice(cfg, self.model):
            self.rt.print(notice)
        self.objective, self.building = objective or build_objective(cfg, self.corpus, self.model), True
        self.method = method_name(self.objective)
        if saved is not None:
            check_resume_method(saved, self.method, self.out_dir / 'ckpt.pt')
        self.ctx = RunContext(self)
        self.objective.setup(self.ctx)  # requests only: the pieces below are built from them
        self._build(cfg)
        if saved is not None:
            now, named = self.identity(), saved.get('identity')
            if isinstance(named, dict):  # a checkpoint saved before whole-stream fingerprints named the first tokens
                now['corpus'] = self.corpus.as_named(named.get('corpus'))
            check_resume_identity(saved, now, self.out_dir / 'ckpt.pt')
        self.iter_num, self.val_loss, self.best_val_loss, self.evaluated_at = 0, float('inf'), float('inf'), None
        self.skipped_steps, self.last_wall, self.last_cost = 0, 0.0, 0.0
        self.branch_points = sorted(branch_points)
        if saved is not None:
            self._resume(saved)
        else:
            self.budget.charge_before_start(self.ctx.charges)
        self.building = False
        self.wandb = start_wandb(cfg, saved) if cfg.wandb_log and self.rt.master else None  # once the run can start
        if saved is not None and self.rt.master:  # the first write of a resume: after every refusal (a missing extra too)
            trim_log(self.out_dir / 'log.jsonl', self.iter_num)
        self.train_model = compiled(self.model, cfg.arch) if cfg.compile else self.model
        if self.rt.world_size > 1:
            self.train_model = DDP(self.train_model, device_ids=[self.rt.local_rank] if self.rt.device.type == 'cuda' else None,
                                   find_unused_parameters=cfg.arch != 'full')  # skipped blocks get no grads
        self.peak_flops = cfg.peak_flops or budget_lib.device_peak_flops(self.rt.device)

    def _build(self, cfg):
        """The data stream, the val set, the optimizer, the budget and the active-layer schedule."""
        T_data, splits = example_length(cfg, self.model), self.corpus.splits
        batches = Batches(splits['train'], T_data, cfg.seed, examples=self.ctx.examples,
                          rank=self.rt.rank, world_size=self.rt.world_size)
        self.data = DataSource(batches, self.rt.device)
        val = get_examples(splits['val'], val_ids(splits['val'], T_data, cfg.eval_batches * cfg.batch_size), T_data)
        self.val_inputs, self.val_targets = self.objective.val_batch(*val)
        self.bs = cfg.batch_size * cfg.grad_accum * self.rt.world_size * targets_per_example(cfg, self.model)
        self.optimizer, self.hooks = build_optimizer(cfg, self.model, self.bs, self.ctx.param_groups)
        self.decay = cfg.optimizer not in SCHEDULE_FREE  # the schedule decays the lr to min_lr; else its peak after warm-up
        needs = {'optimizer': [cfg.optimizer], 'hessian': [h.charge_as for h in self.hooks if h.charge_as]}
        table = budget_lib.load_table(run_shape_key(cfg, self.model), cfg.rst_table, cfg.budget_unit == 'rst', needs,
                                      data_keys(cfg))
        self.budget = budget_lib.Budget(cfg.budget_unit, cfg.budget, table, lambda L: self.model.flops_per_token(L),
                                        self.model.config.block_size, cfg.batch_size)
        self.arch = build_arch(cfg, self.model.n_layer)
        self._check_budget_fits_a_step(cfg)

    def _check_budget_fits_a_step(self, cfg):
        """A budget below one step would train that step at the end of its schedule (lr min_lr) and call the
        run finished: refused, naming the smallest budget a plain step of this run spends."""
        depth = 1 if cfg.arch == 'drop' else getattr(self.arch, 'n_active', self.model.n_layer)  # the cheapest first step
        step = self.budget.one_step(cfg.batch_size * cfg.grad_accum * self.rt.world_size, depth, cfg.optimizer)
        if step is not None and self.budget.spent[cfg.budget_unit] is not None:
            require(cfg.budget >= step, f'--budget={cfg.budget:g} {cfg.budget_unit} is smaller than one training step of '
                                        f'this run ({step:.4g} {cfg.budget_unit}): give --budget >= {step:.4g}')

    def _stateful(self):
        """The pieces whose state_dict a checkpoint holds, under its keys (loaded back in this order)."""
        return {'model': self.model, 'optimizer': self.optimizer, 'budget': self.budget, 'data': self.data.batches,
                'objective': self.objective, 'arch': self.arch}

    def identity(self):
        """What a resumed run must share with the saved one beyond its keys: the DDP world size (the data order
        is sliced by it), the corpus's content (re-prepared at the same path), the cost table's content
        (recalibrated under the same name)."""
        table = self.budget.table
        return {'world_size': self.rt.world_size, 'corpus': self.corpus.fingerprint(),
                'rst_table': None if table is None else hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]}

    def _resume(self, ckpt):
        with refused_if_damaged(self.out_dir / 'ckpt.pt', 'cannot be resumed', 'it is damaged: resume from an intact '
                                'copy, or start again with --init_from=scratch --overwrite=True'):  # before anything is written
            fresh = [{k: v for k, v in g.items() if k != 'params'} for g in self.optimizer.param_groups]
            for name, piece in self._stateful().items():
                piece.load_state_dict(ckpt[name])
            check_optimizer_state(self.optimizer, fresh)
            self.model.set_active_layers(ckpt['active_layers'])
            self.iter_num, self.val_loss = ckpt['iter_num'], ckpt['val_loss']
            if not is_count(self.iter_num):
                raise ValueError(f'iter_num={self.iter_num!r} is not a step count')
            self.best_val_loss = ckpt.get('best_val_loss', self.val_loss)
            self.last_wall, self.last_cost = ckpt.get('last_wall', 0.0), ckpt.get('last_cost', 0.0)
            for name in ('val_loss', 'best_val_loss', 'last_wall', 'last_cost'):  # inf: not evaluated yet
                value = getattr(self, name)
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f'{name}={value!r} is not a number')
            # saved right after this step's eval, except a WSD branch point: a branch evaluates when it ends
            self.evaluated_at = self.iter_num if ckpt.get('evaluated', True) else None
            torch.set_rng_state(ckpt['rng']['cpu'])
            if self.rt.device.type == 'cuda' and ckpt['rng']['cuda'] is not None:
                torch.cuda.set_rng_state(ckpt['rng']['cuda'])
        self.rt.print(f'resumed from {self.out_dir / "ckpt.pt"} at step {self.iter_num}, '
                      f'{100 * self.budget.progress:.1f}% of the budget spent')

    def checkpoint(self, path=None, cfg=None):
        """Save the run (to out_dir/ckpt.pt, or to path as the run cfg names: a WSD branch's)."""
        if not self.rt.master:
            return
        with evaluation_point(self.optimizer):  # saved before train() moves the weights back: state_dicts share them
            ckpt = {name: piece.state_dict() for name, piece in self._stateful().items()}
            ckpt.update(model_args=dataclasses.asdict(self.model.config), iter_num=self.iter_num, method=self.method,
                        identity=self.identity(),
                        val_loss=self.val_loss, best_val_loss=self.best_val_loss, config=dataclasses.asdict(cfg or self.cfg),
                        active_layers=self.model.active_layers, evaluated=self.evaluated_at == self.iter_num,
                        last_wall=self.last_wall, last_cost=self.last_cost, wandb_id=self.wandb and self.wandb.id,
                        rng={'cpu': torch.get_rng_state(),
                             'cuda': torch.cuda.get_rng_state() if self.rt.device.type == 'cuda' else None})
            save_checkpoint(path or self.out_dir / 'ckpt.pt', ckpt)

    def start_folder(self):
        """Once every check has passed: a fresh run removes what an old run (--overwrite=True) left, its
        checkpoint with its log, so the folder never mixes two runs; then config.json and the setup's records."""
        fresh = self.cfg.init_from != 'resume'
        if self.rt.master and fresh:
            (self.out_dir / 'ckpt.pt').unlink(missing_ok=True)
            atomic_write_bytes(self.out_dir / 'log.jsonl', b'')
        if self.rt.master:
            atomic_write_bytes(self.out_dir / 'config.json', self.config_record(self.cfg))
            (self.out_dir / 'stopped.json').unlink(missing_ok=True)  # it runs again: no longer a stopped run,
            for record in ('done.json', 'eval.json'):  # nor a finished one (madpo.py's stage, slm.py's arm)
                (self.out_dir / record).unlink(missing_ok=True)
        if fresh:  # a resumed run's log has them
            for record in self.ctx.records:
                self.log(record)

    def config_record(self, cfg):
        """config.json: the keys, the command and versions (runs.run_info), and the model trained (its model_args,
        which --init_from=PATH takes from the checkpoint whatever the keys say)."""
        return json.dumps({**run_info(cfg), 'model_args': dataclasses.asdict(self.model.config)}, indent=1).encode()

    def log(self, record):
        if self.rt.master:
            with open(self.out_dir / 'log.jsonl', 'a') as f:
                f.write(json.dumps(record) + '\n')
            if self.wandb is not None:
                self.wandb.log(record)

    def eval_and_save(self):
        with evaluation_point(self.optimizer):
            if self.objective.evaluate is not None:
                self.val_loss = self.objective.evaluate(self.model, self.ctx)
            else:
                self.val_loss = evaluate(self.model, self.val_inputs, self.val_targets, self.cfg.batch_size, self.rt,
                                         self.arch.eval_layers(self.model))
        self.best_val_loss = min(self.best_val_loss, self.val_loss)
        self.log({'step': self.iter_num, 'val_loss': self.val_loss, **self.budget.spent, 'rst_by_entry': dict(self.budget.by_entry)})
        self.evaluated_at = self.iter_num
        self.checkpoint()
        self.rt.print(f'step {self.iter_num} | val loss {self.val_loss:.4f} | saved {self.out_dir / "ckpt.pt"}')

    def accumulate(self, micro_loss):
        """Backpropagate the mean of micro_loss(model) over grad_accum micro-batches through the model the
        loop trains (DDP-wrapped in a DDP run: gradients are all-reduced once, on the last micro-batch).
        Returns the mean loss (a 0-d tensor). Training steps and Sophia's estimate both go through here."""
        total, n = 0.0, self.cfg.grad_accum
        for micro in range(n):
            if isinstance(self.train_model, DDP):
                self.train_model.require_backward_grad_sync = micro == n - 1
            with self.rt.autocast():
                loss = micro_loss(self.train_model)
            (loss / n).backward()
            total += loss.detach()
        return total / n

    def train_step(self):
        """One optimizer step: grad_accum micro-batches from the objective, clip, update, charge, hooks."""
        cfg, logs, depth = self.cfg, {}, []
        before = self.budget.spent[cfg.budget_unit]
        self.arch.before_step(self.model, self.optimizer, self.budget.progress)  # the budget-progress hook

        def micro_loss(model):
            self.arch.before_micro_batch(self.model, self.budget.progress)
            depth.append(len(self.model.active_layers))
            step = self.objective(model, self.data, self.ctx)
            self.budget.charge_train(step.examples * self.rt.world_size, depth[-1])
            for k, v in step.logs.items():
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
            return step.loss
        loss = self.accumulate(micro_loss)
        if not math.isfinite(float(loss)):  # one sync a step: a nan must never reach the weights
            self.optimizer.zero_grad(set_to_none=True)
            if not cfg.skip_nonfinite:
                kept = 'the last good checkpoint is kept' if (self.out_dir / 'ckpt.pt').exists() else 'no checkpoint saved yet'
                raise NonFiniteLoss(f'loss is {float(loss)} at step {self.iter_num + 1}: {kept}; lower --lr, '
                                    f'raise --warmup_frac, or pass --skip_nonfinite=True')
            self.skipped_steps += 1
            return loss, before, {**logs, 'skipped_steps': self.skipped_steps}
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.budget.charge_optimizer(cfg.optimizer)
        lr = self.step_lr(before)
        for group in self.optimizer.param_groups:  # a group may run at a multiple of it (Muon's matrices)
            group['lr'] = lr * group.get('lr_scale', 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for hook in self.hooks:  # every-k-steps hooks (Sophia-G's Hessian estimate), after the step
            if self.iter_num % hook.every == hook.every - 1:
                logs.update(hook(self.optimizer, self.accumulate, lambda: self.objective.hessian_batch(self.data)))
                if hook.charge_as:
                    examples = self.cfg.batch_size * self.cfg.grad_accum * self.rt.world_size
                    self.budget.charge_hessian(hook.charge_as, examples, len(self.model.active_layers))
        logs['active_layers'] = sum(depth) / len(depth)
        return loss, lr, logs

    def step_lr(self, before):
        """The schedule's lr at the middle of this step's cost (in budget units): the first step does not
        run at lr 0, and min_lr is reached exactly when the budget is spent. A wall-clock budget uses the
        previous step's time as this one's. The schedule spans the budget left after costs paid before the
        first step (Budget.schedule_span)."""
        unit = self.cfg.budget_unit
        after = before + self.last_wall if unit == 'wall' else self.budget.spent[unit]
        offset, length = self.budget.schedule_span()
        return budget_lib.lr_at((before + after) / 2 - offset, length, self.cfg, self.decay)

    def run(self):
        cfg, rt = self.cfg, self.rt
        self.start_folder()
        inputs = cfg.batch_size * cfg.grad_accum * rt.world_size * self.model.config.block_size
        per_step = f'{inputs:,} tokens' + (f' ({self.bs:,} targets)' if self.bs != inputs else '')  # T5: the loss averages its targets
        rt.print(f'{self.model.num_params() / 1e6:.2f}M params | {per_step} per step | '
                 f'budget {cfg.budget:g} {cfg.budget_unit} | {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule if self.decay else "constant"} | '
                 f'arch {cfg.arch} | data {self.corpus.path} | device {rt.device} {str(rt.dtype).removeprefix("torch.")}')
        self.model.train()
        training_point(self.optimizer)
        interrupted, t_start, meter = False, time.time(), budget_lib.Meter(self.budget)
        if self.budget.done and self.iter_num == 0:  # a row the table reports, and leaves out of its tests
            rt.print(f'the costs paid before the first step ({self.budget.before_start:.4g} {cfg.budget_unit}) use the '
                     f'whole budget: this run trains no step')
        try:
            with signals_between_steps() as stop:
                while not self.budget.done:
                    if agreed_stop(rt, stop):
                        raise KeyboardInterrupt
                    t0, before = time.time(), self.budget.spent[cfg.budget_unit]
                    loss, lr, logs = self.train_step()
                    self.last_wall = time.time() - t0
                    if cfg.budget_unit == 'wall':  # with DDP all ranks must stop together: the slowest rank's time
                        self.last_wall = rt.reduce(self.last_wall, dist.ReduceOp.MAX)
                    self.budget.add_wall(self.last_wall)
                    self.last_cost = self.budget.spent[cfg.budget_unit] - before
                    self.iter_num += 1
                    meter.add(loss, logs)
                    if self.iter_num % cfg.log_interval == 0 or self.budget.done:
                        self._log_progress(meter, lr)
                    if self.iter_num % cfg.eval_interval == 0 and not self.budget.done:
                        self.eval_and_save()
                    self.save_branch_points()  # after this step's log line: the branch's log must hold it
        except KeyboardInterrupt:
            interrupted = True
            rt.print(f'interrupted at step {self.iter_num}: saving a checkpoint')
        except NonFiniteLoss:
            self.log({'step': self.iter_num + 1, 'nonfinite': True, **self.budget.spent})
            raise
        if self.evaluated_at != self.iter_num:  # Ctrl-C just after an eval: that step is logged and saved
            self.eval_and_save()
        if interrupted and rt.master:  # the folder says so too: a stopped run is not a finished one
            atomic_write_bytes(self.out_dir / 'stopped.json', json.dumps(
                {'step': self.iter_num, 'signal': stop_signal_name(), 'spent': self.budget.spent}).encode())
        rt.print(f'{"stopped" if interrupted else "done"}: {self.iter_num} steps, {self.budget.spent["tokens"]:,.0f} '
                 f'tokens, {format_seconds(time.time() - t_start)} wall, {"val" if interrupted else "final val"} loss '
                 f'{self.val_loss:.4f}' + (' (a checkpoint: --init_from=resume continues it)' if interrupted else ''))
        if rt.master and cfg.sample_tokens and not interrupted:
            with evaluation_point(self.optimizer):
                rt.print('--- sample ---' + sample_text(self.model, self.tokenizer, rt, cfg.sample_tokens, prompt_text(cfg.start),
                                                        temperature=cfg.temperature, top_k=cfg.top_k) + '\n---')
        if self.wandb is not None:
            self.wandb.finish()
        return {'steps': self.iter_num, 'val_loss': self.val_loss, 'spent': dict(self.budget.spent),
                'interrupted': interrupted}

    def save_branch_points(self):
        """WSD cooldown branches: checkpoint the trunk just before each smaller budget's cooldown begins,
        i.e. before the first step whose middle (where step_lr reads the schedule) would lie past it; the
        next step is assumed to cost what this one did."""
        spent = self.budget.spent[self.cfg.budget_unit]
        while self.branch_points and spent + self.last_cost / 2 > self.branch_points[0][0]:
            _, path, budget = self.branch_points.pop(0)
            path.parent.mkdir(parents=True, exist_ok=True)
            branch = dataclasses.replace(self.cfg, budget=budget, out_dir=str(path.parent))
            self.checkpoint(path, branch)
            if self.rt.master:  # the folder is the branch's from here: an older run's config and stop go too
                log = self.out_dir / 'log.jsonl'  # the trunk's log so far is the branch's
                atomic_write_bytes(path.parent / 'log.jsonl', log.read_bytes() if log.exists() else b'')
                atomic_write_bytes(path.parent / 'config.json', self.config_record(branch))
                (path.parent / 'stopped.json').unlink(missing_ok=True)

    def _log_progress(self, meter, lr):
        loss, logs, rates = meter.read(self.peak_flops, self.rt.world_size)
        if rates['mfu'] > 1 and not self.cfg.peak_flops:  # the cached CPU peak was measured under load
            peak = budget_lib.device_peak_flops(self.rt.device, remeasure=True)
            rates['mfu'] *= self.peak_flops / peak
            self.peak_flops = peak
        loss = self.rt.reduce(loss, dist.ReduceOp.AVG)
        self.log({'step': self.iter_num, 'train_loss': loss, 'lr': lr, **rates, **self.budget.spent, **logs})
        extra = ''.join(f' | {k} {v:.4g}' for k, v in logs.items() if k != 'active_layers' or self.cfg.arch != 'full')
        self.rt.print(f"step {self.iter_num} | loss {loss:.4f} | lr {lr:.2e} | budget {100 * self.budget.progress:.1f}% "
                      f"eta {format_seconds(rates['eta_s'])} | {rates['tokens_per_s'] / 1e3:.1f}k tok/s | "
                      f"mfu {100 * rates['mfu']:.1f}%{extra}")


def shape_notice(cfg, model):
    """--init_from=PATH trains the checkpoint's model whatever the shape keys say (runs.build_model): said in a
    line when they differ, and config.json records the model trained (its model_args), not only the keys."""
    keys = cfg.model_dims()
    actual = {k: getattr(model.config, k) for k in keys}
    if not cfg.init_from.endswith('.pt') or actual == keys:
        return None
    shape = lambda dims: ', '.join(f'{k}={v}' for k, v in dims.items())  # noqa: E731
    return f"--init_from={cfg.init_from}: training its model ({shape(actual)}); the shape keys' {shape(keys)} are not used"


def same_kind(saved, fresh):
    """Whether a saved value is of the fresh one's kind: numbers (a tensor too) for numbers, a sequence of as
    many for a sequence, else the same type; None, an optimizer's unset optional setting, fits any."""
    if saved is None or fresh is None:
        return True
    if isinstance(fresh, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(fresh) and all(map(same_kind, saved, fresh))
    if isinstance(fresh, (int, float, torch.Tensor)) and not isinstance(fresh, bool):
        return isinstance(saved, (int, float, torch.Tensor)) and not isinstance(saved, bool)
    return type(saved) is type(fresh)


def check_optimizer_state(optimizer, fresh):
    """A loaded optimizer state, checked as torch's load_state_dict does not: each setting of the kind a fresh
    optimizer's is (fresh: its groups' settings), each state tensor the shape of its parameter (or a scalar).
    Damage would fail at the first step, after a resume has trimmed the log: here it is refused before."""
    for group, before in zip(optimizer.param_groups, fresh):
        for k, v in before.items():
            if not same_kind(group.get(k), v):
                raise ValueError(f'optimizer setting {k}={group.get(k)!r} is not like {v!r}')
        for p in group['params']:
            for k, s in optimizer.state.get(p, {}).items():
                if torch.is_tensor(s) and s.numel() > 1 and s.shape != p.shape:
                    raise ValueError(f'optimizer state {k} has shape {tuple(s.shape)}, its parameter {tuple(p.shape)}')


def check_resume_identity(ckpt, now, path):
    """A resume refused, before anything is written, when the run would not continue the saved one: another
    world size, corpus content or cost table (checkpoints from before the identity was saved are not checked)."""
    saved = ckpt.get('identity')
    for name, what in (('world_size', 'DDP world size'), ('corpus', 'corpus content'), ('rst_table', 'RST cost table')):
        if isinstance(saved, dict) and name in saved and saved[name] != now[name]:
            raise UserError(f'{path} was saved with another {what} ({saved[name]!r}, this run has {now[name]!r}): resume '
                            'with the same, or start a new run in another --out_dir')


def train(cfg, objective=None, branch_points=()):
    """Run one budgeted training run; returns its summary. Method files call this with their objective."""
    try:
        with locked_out_dir(cfg):
            try:
                trainer = Trainer(cfg, objective, branch_points)
            except KeyboardInterrupt:
                raise Interrupted('interrupted before step 1: nothing saved' if cfg.init_from != 'resume'
                                  else 'interrupted while resuming: the saved run is unchanged') from None
            try:
                return trainer.run()
            except KeyboardInterrupt:  # outside a step: the folder's start, or a second Ctrl-C in the final save
                raise Interrupted(f'stopped by {stop_signal_name()} before the run finished: ' + (
                    '--init_from=resume continues from the last checkpoint it saved'
                    if (Path(cfg.out_dir) / 'ckpt.pt').exists() else
                    'it saved no checkpoint, so run the same command with --overwrite=True to start it again')) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_wsd_branches(cfg, objective_fn=lambda cfg: None):
    """WSD with cooldown branches (SPEC section 7, budget.branch_plan): one trunk runs to the largest
    budget and, just before each smaller budget's cooldown starts, saves a checkpoint from which a branch
    cools down to exactly that budget. Every budget B gets a run folder out_dir/budget_B that reads like
    a standalone run, and equals one bit for bit (on the CPU: CUDA kernels need not be deterministic).
    A killed trunk or branch resumes. --overwrite=True deletes nothing up front: the trunk replaces its run
    once its checks pass (Trainer.start_folder), and each branch's when the trunk reaches its branch point,
    with the branches' folders locked meanwhile, so a failed call or a live branch run loses nothing."""
    budgets, folder, points, base = budget_lib.branch_plan(cfg)
    runs_of = {}
    for b, multiple in zip(budgets, sorted(cfg.branch_budgets)):  # every branch's keys checked now, not hours later
        try:                                                         # when the trunk reaches its branch point
            runs_of[b] = dataclasses.replace(base, budget=b, out_dir=str(folder[b]))
        except UserError as e:  # the check's own fix names a --budget not given: left out
            raise UserError(f'--branch_budgets={cfg.branch_budgets}: its {multiple:g} x --budget={cfg.budget:g} is a '
                            f"budget of {b:g} {cfg.budget_unit}, which fails a check ({str(e).split(': give')[0]}): give "
                            'other multiples') from None
    other = [b for b in budgets if (folder[b] / 'config.json').exists() and not records_config(
        folder[b], dataclasses.asdict(runs_of[b]))]
    trunk = runs_of[budgets[-1]]
    going = budgets[-1] not in other and (folder[budgets[-1]] / 'ckpt.pt').exists() and not run_finished(trunk.out_dir)
    unreached = [b for b in other if going]  # an --overwrite=True trunk stopped before them: replaced when reached
    require(cfg.overwrite or set(other) <= set(unreached), f'{other and folder[other[0]]} holds a run of another config: '
                                                           f'--overwrite=True to replace these branches, or another --out_dir')
    if cfg.overwrite or not run_finished(trunk.out_dir):
        # no trunk checkpoint: a first run, or one killed before it saved (its log is stale: start again)
        resume = not cfg.overwrite and (folder[budgets[-1]] / 'ckpt.pt').exists()
        trunk = dataclasses.replace(trunk, init_from='resume' if resume else cfg.init_from, overwrite=not resume)
        todo = [(points[b], folder[b] / 'ckpt.pt', b) for b in budgets[:-1]
                if cfg.overwrite or b in unreached or not (folder[b] / 'ckpt.pt').exists()]
        with locked_folders([path.parent for _, path, _ in todo]):
            if train(trunk, objective_fn(trunk), todo)['interrupted']:
                return {}  # Ctrl-C: stop here; the command without --overwrite resumes the trunk, then the branches
    results = {}
    for b in budgets[:-1]:
        if not run_finished(folder[b]):
            branch = dataclasses.replace(base, budget=b, out_dir=str(folder[b]), init_from='resume')
            results[b] = train(branch, objective_fn(branch))
            if results[b]['interrupted']:
                return results
    spent = budgets[-1] + cfg.cooldown_frac * sum(budgets[:-1])
    print(f'budgets {", ".join(f"{b:g}" for b in budgets)} {cfg.budget_unit}: branches spent {spent:g}, '
          f'separate runs would spend {sum(budgets):g} ({spent / sum(budgets):.2f}x)')
    return results


def prompt_text(start):
    """--start as given, or the text of a file with --start=FILE:path (nanoGPT's sample.py convention)."""
    if not start.startswith('FILE:'):
        return start
    path = Path(start[5:])
    try:
        return path.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'--start={start}: cannot read {path} as UTF-8 text ({type(e).__name__}): give a readable text file')


def sample_only(cfg):
    """--sample_only=True: print --num_samples continuations of --start from a saved model, no training."""
    path = Path(cfg.out_dir) / 'ckpt.pt' if cfg.init_from == 'resume' else Path(cfg.init_from)
    require(cfg.init_from != 'scratch', '--sample_only needs --init_from=resume (out_dir\'s run) or a checkpoint path')
    rt, ckpt = setup_device(cfg), load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path, dropout=0.0, compile_loss=False).to(rt.device).eval()
    name = ckpt.get('config', {}).get('tokenizer', cfg.tokenizer)
    require(isinstance(name, str), f"{path} is damaged: its config's tokenizer is {name!r}, not a name: use an intact checkpoint")
    tokenizer = get_tokenizer(name)
    for i in range(cfg.num_samples):
        print(f'--- sample {i + 1} ---\n' + sample_text(model, tokenizer, rt, cfg.sample_tokens or 300, prompt_text(cfg.start),
                                                       cfg.seed + i, cfg.temperature, cfg.top_k))


def main(cfg):
    if cfg.sample_only:
        return sample_only(cfg)
    return train_wsd_branches(cfg) if cfg.branch_budgets else train(cfg)


if __name__ == '__main__':
    cli(main, TrainConfig)
