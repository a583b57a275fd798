"""Preference optimization on an offline sentiment task: reward model, DPO, cDPO, IPO, beta-DPO and MADPO.

MADPO: "Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference Optimization"
(arXiv 2510.05342 v1, Oct 2025). Baselines: DPO (Rafailov et al. 2023, arXiv 2305.18290) and its
conservative variant with label smoothing (cDPO), IPO (Azar et al. 2023, arXiv 2310.12036), beta-DPO
(Wu et al. 2024, arXiv 2407.08639).
The idea: a Bradley-Terry reward model gives each preference pair a margin m; MADPO multiplies the pair's
DPO loss by a detached weight w(m), which amplifies the target margin of hard pairs (small |m|) and damps
easy ones (large m), instead of one beta for every pair (DPO) or for a batch (beta-DPO).

The task (the paper's, offline; data/reviews/): continue a review prompt so that the text is positive,
ground truth r = 3 * VADER compound(prompt + continuation) in [-3, 3]. Stages, each through train.train:
  sft    a small byte-level GPT on generated reviews (data/reviews/prepare.py; prepared on first use)
  pairs  two SFT samples per prompt, Bradley-Terry labels; tiers high / medium / low (data/reviews/pairs.py)
  rm     Bradley-Terry reward model, loss -log sigmoid(r_w - r_l): the SFT backbone + a scalar head on the mean
         hidden state of the continuation (--rm_pool=last reads the last real token, as the paper's RM does;
         at this size it stays at chance on held-out pairs, so mean is the default)
  po     --loss=dpo|cdpo|ipo|bdpo|madpo from SFT, frozen SFT reference (log-probs precomputed once)
  eval   mean reward (95% CI), Monte-Carlo KL to the reference and win rate vs SFT, on held-out prompts
  compare  the method x tier table (and a reward-vs-KL plot with matplotlib)

    python madpo.py                                   # --stage=all: every stage, one seed (~11 min, 2 CPU cores)
    python madpo.py --quick=True --seeds=(0,1,2)      # a few-minute smoke run per seed
    python madpo.py --stage=po --loss=ipo --tier=low  # one stage (paths under --out_dir/seed<seed>/)

Keys are scoped by stage (sft_*, rm_*, po_*; `--help` lists them, the comments in MadpoConfig say which
stage reads which): each stage builds its own train.TrainConfig, so a loop key such as --arch is refused.
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

import train
from configurator import UserError, cli, require
from data.loader import data_dir, file_sha256
from data.reviews.evaluate import HEADER, evaluate_policies, plot, reward_table
from data.reviews.pairs import TIERS, build_pairs, load_pairs
from model import evaluating

LOSSES = ('dpo', 'cdpo', 'ipo', 'bdpo', 'madpo')


# -----------------------------------------------------------------------------
# the losses: h = (logp_w - ref_w) - (logp_l - ref_l), the implicit reward margin, per pair

def dpo_loss(h, beta):
    """DPO: -log sigmoid(beta * h)."""
    return -F.logsigmoid(beta * h)


def cdpo_loss(h, beta, eps):
    """Conservative DPO: each label is wrong with probability eps, -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    return (1 - eps) * dpo_loss(h, beta) + eps * dpo_loss(-h, beta)


def ipo_loss(h, beta):
    """IPO: (h - 1/(2 beta))^2 (TRL feeds it per-token-averaged log-ratios, the MADPO baseline summed ones)."""
    return (h - 1 / (2 * beta)) ** 2


def implicit_margin(logps, ref_logps, lens=None):
    """h from (B, 2) summed log-probs of [chosen, rejected]; with lens (B, 2), from per-token-averaged
    log-ratios (TRL's IPO) instead of summed ones."""
    ratio = logps - ref_logps
    if lens is not None:
        ratio = ratio / lens
    return ratio[:, 0] - ratio[:, 1]


class BetaDPO:
    """beta-DPO as the authors' code runs it: running mean/std of the margins (momentum 0.9, from 0),
    updated from the whole batch; keep 80% of the pairs, drawn without replacement with Gaussian weights
    around the running mean; beta = beta0 * (1 + alpha * (mean kept margin - running mean)) >= 1e-3."""

    def __init__(self, beta0, alpha=0.6, keep=0.8, momentum=0.9):
        self.beta0, self.alpha, self.keep, self.momentum = beta0, alpha, keep, momentum
        self.mean, self.std = 0.0, 0.0

    def __call__(self, h, generator=None):
        """-> (loss averaged over the kept pairs, beta, kept indices)."""
        m = h.detach().float()
        self.mean = self.momentum * self.mean + (1 - self.momentum) * m.mean().item()
        self.std = self.momentum * self.std + (1 - self.momentum) * m.std().item()
        weight = torch.exp(-0.5 * ((m - self.mean) / max(self.std, 1e-8)) ** 2)
        if not weight.sum() > 0:  # every margin far out (or std 0 at the start): draw uniformly
            weight = torch.ones_like(m)
        kept = torch.multinomial(weight.cpu(), max(1, int(len(m) * self.keep)), replacement=False, generator=generator)
        kept = kept.to(h.device)
        beta = max(self.beta0 * (1 + self.alpha * (m[kept].mean().item() - self.mean)), 1e-3)
        return dpo_loss(h[kept], beta).mean(), beta, kept

    def state_dict(self):
        return {'mean': self.mean, 'std': self.std}

    def load_state_dict(self, state):
        self.mean, self.std = state['mean'], state['std']


def madpo_c(a, c_max=4.0, lam=1.0, tau=math.log(999)):
    """c(a) = c_min + (c_max - c_min) / (1 + K exp(lam (a - tau))), K = (c_max - 1)/(1 - c_min): c(tau) = 1."""
    c_min = 1 / c_max
    K = (c_max - 1) / (1 - c_min)
    return c_min + (c_max - c_min) / (1 + K * torch.exp(lam * (a - tau)))


def madpo_weight(m, c_max=4.0, lam=1.0, tau=math.log(999)):
    """w(m) = sigmoid(c(|m|) m) / sigmoid(m) for m > -tau, else 1 (m = the RM's margin toward the winner)."""
    w = torch.sigmoid(madpo_c(m.abs(), c_max, lam, tau) * m) / torch.sigmoid(m)
    return torch.where(m > -tau, w, torch.ones_like(w))


def madpo_loss(h, w, beta):
    """MADPO: mean of w_i * -log sigmoid(beta h_i), the weights detached."""
    return (w.detach() * dpo_loss(h, beta)).mean()


# -----------------------------------------------------------------------------
# sequences: prompt + continuation, log-probs of the continuation only

def continuation_targets(seq, prompt_len, cont_len):
    """seq (N, L) -> x (N, L-1) and targets with -1 everywhere but the continuation (eos included)."""
    pos = torch.arange(1, seq.size(1), device=seq.device)  # position in seq of each target
    keep = (pos >= prompt_len) & (pos < prompt_len + cont_len[:, None])
    return seq[:, :-1], torch.where(keep, seq[:, 1:], -1)


def sequence_logps(model, seq, prompt_len, cont_len):
    """Summed log-probs of each continuation given its prompt: (N,). Prompt and padding count 0."""
    x, targets = continuation_targets(seq, prompt_len, cont_len)
    return -model(x, targets).sum(1)


@torch.no_grad()
def batched_logps(model, seq, prompt_len, cont_len, batch=64):
    with evaluating(model):
        return torch.cat([sequence_logps(model, seq[i:i + batch], prompt_len, cont_len[i:i + batch])
                          for i in range(0, len(seq), batch)])


# -----------------------------------------------------------------------------
# the rm and po objectives: pair batches from a saved pairs file instead of the token stream

class PairObjective(train.CausalLM):
    """Ignores the loop's `data`: draws cfg.pair_batch pairs per micro-batch in a seeded order per epoch."""

    def __init__(self, cfg, pairs_path):
        super().__init__(cfg.pair_batch)
        self.cfg, self.pairs_path, self.epoch, self.pos = cfg, Path(pairs_path), 0, 0

    def setup(self, ctx):
        self.device = ctx.device
        self.train_set, self.val_set = load_pairs(self.pairs_path, self.device)  # (seq (n, 2, L), lens (n, 2), r (n, 2))

    def next_indices(self):
        n = len(self.train_set[0])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch))
        idx = order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        if self.pos >= n:
            self.epoch, self.pos = self.epoch + 1, 0
        return idx.to(self.device)

    def flat(self, seq, lens):
        """(B, 2, L), (B, 2) -> chosen then rejected: (2B, L), (2B,)."""
        return torch.cat([seq[:, 0], seq[:, 1]]), torch.cat([lens[:, 0], lens[:, 1]])

    def state_dict(self):
        return {'epoch': self.epoch, 'pos': self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state['epoch'], state['pos']


class RewardObjective(PairObjective):
    """Bradley-Terry reward model: the GPT backbone + a scalar head on the continuation's mean hidden state
    or on its last real token (--rm_pool). It reads model.hidden, which the loop's model (one process,
    not compiled: main refuses torchrun) exposes."""

    def __init__(self, cfg, pairs_path):
        super().__init__(cfg, pairs_path)
        self.pool = cfg.rm_pool

    def setup(self, ctx):
        super().setup(ctx)
        self.head = torch.nn.Linear(ctx.model.config.n_embd, 1).to(self.device)
        ctx.add_params(self.head.parameters(), weight_decay=0.0)

    def rewards(self, model, seq, lens):
        """r (N,): the head on the last real token (the eos, or the last byte), or on the continuation's mean."""
        h = model.hidden(seq)                                                # (N, L, C)
        if self.pool == 'last':
            features = h[torch.arange(len(seq), device=seq.device), self.cfg.prompt_len + lens - 1]
        else:
            pos = torch.arange(seq.size(1), device=seq.device)
            in_cont = (pos >= self.cfg.prompt_len) & (pos < self.cfg.prompt_len + lens[:, None])  # (N, L)
            features = (h * in_cont[..., None]).sum(1) / lens[:, None]
        return self.head(features).squeeze(-1).float()

    def __call__(self, model, data, ctx):
        idx = self.next_indices()
        seq, lens = self.flat(self.train_set[0][idx], self.train_set[1][idx])
        r_w, r_l = self.rewards(model, seq, lens).chunk(2)
        return train.Step(-F.logsigmoid(r_w - r_l).mean(), len(seq), {'rm_acc': (r_w > r_l).float().mean().detach()})

    def load_frozen(self, rm_dir, device):
        """The trained reward model for MADPO's margins: its backbone (ckpt.pt) and head (head.pt, with
        the pooling it was trained with)."""
        if not (Path(rm_dir) / 'head.pt').exists():
            raise UserError(f'no finished reward model in {rm_dir}: run --stage=rm for this tier first')
        self.model = train.load_model(Path(rm_dir) / 'ckpt.pt', device, self.cfg.compile_loss)
        saved = torch.load(Path(rm_dir) / 'head.pt', map_location=device, weights_only=True)
        self.head, self.pool = torch.nn.Linear(self.model.config.n_embd, 1).to(device).eval(), saved['rm_pool']
        self.head.load_state_dict(saved['head'])

    @torch.no_grad()
    def margins(self, model, seq, lens, batch=64):
        """r(chosen) - r(rejected) for pairs (n, 2, L)."""
        out = []
        for i in range(0, len(seq), batch):
            r_w, r_l = self.rewards(model, *self.flat(seq[i:i + batch], lens[i:i + batch])).chunk(2)
            out.append(r_w - r_l)
        return torch.cat(out)

    def evaluate(self, model, ctx):
        """Held-out BT loss; also the accuracy vs the labels and vs the true reward order (ties left out)."""
        with evaluating(model):
            m = self.margins(model, *self.val_set[:2]).cpu()
        r = self.val_set[2]
        strict = r[:, 0] != r[:, 1]
        self.val_metrics = {'acc': (m > 0).float().mean().item(),
                            'true_acc': ((m > 0) == (r[:, 0] > r[:, 1]))[strict].float().mean().item()}
        return -F.logsigmoid(m).mean().item()

    def state_dict(self):
        return {**super().state_dict(), 'head': self.head.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.head.load_state_dict(state['head'])


class PreferenceObjective(PairObjective):
    """DPO, cDPO, IPO, beta-DPO or MADPO on the policy; reference log-probs (and MADPO's RM margins) precomputed."""

    def __init__(self, cfg, pairs_path, ref_ckpt, rm_dir=None):
        super().__init__(cfg, pairs_path)
        self.ref_ckpt, self.rm_dir = Path(ref_ckpt), rm_dir
        self.bdpo = BetaDPO(cfg.beta, cfg.bdpo_alpha, cfg.bdpo_keep, cfg.bdpo_momentum)
        self.rng = torch.Generator().manual_seed(cfg.seed)  # beta-DPO's draws; its own, so a resume is exact

    def setup(self, ctx):
        super().setup(ctx)
        sizes = [len(self.train_set[0]), len(self.val_set[0])]
        self.ref_train, self.ref_val = self.reference_logps().to(self.device).split(sizes)
        if self.cfg.loss == 'madpo':
            rm = RewardObjective(self.cfg, self.pairs_path)
            rm.load_frozen(self.rm_dir, self.device)
            self.weights = madpo_weight(rm.margins(rm.model, *self.train_set[:2]), self.cfg.c_max, self.cfg.lam, self.cfg.tau)
            q = torch.quantile(self.weights.cpu(), torch.tensor([0, 0.1, 0.5, 0.9, 1.0])).tolist()
            summary = {'quantiles_0_10_50_90_100': q, 'mean': self.weights.mean().item(),
                       'frac_amplified': (self.weights > 1).float().mean().item(),
                       'histogram_0_to_2_by_0.2': torch.histc(self.weights.cpu(), 10, 0, 2).int().tolist()}
            (ctx.out_dir / 'madpo_weights.json').write_text(json.dumps(summary, indent=1))
            ctx.rt.print(f'MADPO weights: quantiles {", ".join(f"{v:.3f}" for v in q)}, mean {summary["mean"]:.3f}')

    def reference_logps(self):
        """Summed reference log-probs of [chosen, rejected] for every pair (n, 2): computed once per
        (pairs, reference) and cached next to the pairs file."""
        cache = self.pairs_path.with_name(self.pairs_path.stem + '_ref_logps.pt')
        key = file_sha256(self.ref_ckpt) + file_sha256(self.pairs_path)
        if cache.exists():
            saved = torch.load(cache, weights_only=True)
            if saved['key'] == key:
                return saved['logps']
        ref = train.load_model(self.ref_ckpt, self.device, self.cfg.compile_loss)
        seq = torch.cat([self.train_set[0], self.val_set[0]])
        lens = torch.cat([self.train_set[1], self.val_set[1]])
        logps = torch.stack([batched_logps(ref, seq[:, k], self.cfg.prompt_len, lens[:, k]) for k in (0, 1)], 1).cpu()
        train.save_checkpoint(cache, {'key': key, 'logps': logps})  # atomic: parallel runs may share it
        return logps

    def margins_h(self, model, seq, lens, ref, average=False):
        flat_seq, flat_lens = self.flat(seq, lens)
        lp = sequence_logps(model, flat_seq, self.cfg.prompt_len, flat_lens)                 # (2B,)
        return implicit_margin(torch.stack(lp.chunk(2), 1), ref, lens if average else None)

    def __call__(self, model, data, ctx):
        cfg, idx = self.cfg, self.next_indices()
        seq, lens, ref = self.train_set[0][idx], self.train_set[1][idx], self.ref_train[idx]
        h = self.margins_h(model, seq, lens, ref, average=cfg.loss == 'ipo' and cfg.ipo_average)
        logs = {'margin': h.mean().detach(), 'pref_acc': (h > 0).float().mean().detach()}
        if cfg.loss == 'dpo':
            loss = dpo_loss(h, cfg.beta).mean()
        elif cfg.loss == 'cdpo':
            loss = cdpo_loss(h, cfg.beta, cfg.label_smoothing).mean()
        elif cfg.loss == 'ipo':
            loss = ipo_loss(h, cfg.beta).mean()
        elif cfg.loss == 'bdpo':
            loss, logs['beta'], _ = self.bdpo(h, self.rng)
        else:
            w = self.weights[idx]
            loss = madpo_loss(h, w, cfg.beta)
            logs.update(w_mean=w.mean(), w_min=w.min(), w_max=w.max())
        return train.Step(loss, 2 * len(idx), logs)

    @torch.no_grad()
    def evaluate(self, model, ctx):
        """Held-out DPO loss at beta (the same yardstick for every loss), and the preference accuracy."""
        seq, lens = self.val_set[:2]
        with evaluating(model):
            h = torch.cat([self.margins_h(model, seq[i:i + 64], lens[i:i + 64], self.ref_val[i:i + 64])
                           for i in range(0, len(seq), 64)])
        self.val_metrics = {'pref_acc': (h > 0).float().mean().item(), 'margin': h.mean().item()}
        return dpo_loss(h, self.cfg.beta).mean().item()

    def state_dict(self):
        return {**super().state_dict(), 'bdpo': self.bdpo.state_dict(), 'rng': self.rng.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.bdpo.load_state_dict(state['bdpo'])
        self.rng.set_state(state['rng'])


# -----------------------------------------------------------------------------
# config: only the keys that apply; each stage builds its own train.TrainConfig from them

@dataclass(frozen=True)
class MadpoConfig:
    """The stages' keys; each comment starts with the stages that read the key."""
    QUICK: ClassVar[dict] = dict(sft_iters=1500, n_pairs=1500, val_pairs=100, rm_iters=150, po_iters=150, n_eval=200)
    stage: str = 'all'               # sft, pairs, rm, po, eval, compare or all
    out_dir: str = 'out/madpo'       # all stages: <out_dir>/seed<seed>/{sft,pairs,rm_<tier>,po_<loss>_<tier>,eval}
    seed: int = 0                    # all stages (a single stage runs --seed)
    seeds: tuple = (0,)              # --stage=all: runs every stage for each seed
    quick: bool = False              # all stages: a few-minute smoke run (QUICK's sizes for the keys not given)
    losses: tuple = ('dpo', 'ipo', 'bdpo', 'madpo')  # --stage=all: the po losses to run (cdpo too if listed)
    tiers: tuple = tuple(TIERS)      # --stage=all: the pair tiers to run
    init_from: str = 'scratch'       # sft, rm, po: 'resume' continues the stage's checkpoint (--stage=all resumes by itself)
    overwrite: bool = False          # sft, rm, po: replace a run in the stage's folder; --stage=all: rerun finished stages
    threads: int = 0                 # all stages: torch CPU threads; 0 = torch's default (1 is faster on a busy machine)
    dataset: str = 'reviews'         # all stages: data/reviews/byte, generated on first use (or reviews/imdb)
    scorer: str = 'vader'            # pairs, eval: ground truth, vader (offline) or transformer (needs network)
    model: str = 'tiny'              # sft (rm and po start from its checkpoint): a preset in model.PRESETS
    n_layer: int = 0                 # sft: 0 = the preset's
    n_head: int = 0                  # sft: 0 = the preset's
    n_embd: int = 0                  # sft: 0 = the preset's
    block_size: int = 96             # sft: >= prompt_len + max_new
    device: str = 'auto'             # all stages: auto, cpu, cuda, cuda:1, mps
    dtype: str = 'auto'              # sft, rm, po: auto (bf16 on GPU, else float32), float32, bfloat16, float16
    compile_loss: bool = False       # all stages: eager kernels (tiny model, many short runs: compile is a startup cost)
    eval_interval: int = 500         # sft, rm, po: steps between evals and checkpoints
    log_interval: int = 25           # sft, rm, po
    sft_iters: int = 2000            # sft: optimizer steps
    sft_lr: float = 2e-3             # sft: peak lr (cosine, AdamW: train.TrainConfig's defaults)
    sft_batch_size: int = 32         # sft: sequences per step
    prompt_len: int = 24             # pairs, rm, po, eval: prompt bytes (a review's opening)
    max_new: int = 72                # pairs, eval: continuation bytes, eos included
    temperature: float = 1.0         # pairs, eval: sampling; 1 keeps the KL estimate honest
    n_pairs: int = 5000              # pairs: training pairs per tier (one prompt each)
    val_pairs: int = 300             # pairs: held-out pairs per tier (RM accuracy, PO held-out loss)
    n_eval: int = 500                # eval: held-out prompts
    tier: str = 'high'               # rm, po: high (on-policy), medium (half off-policy), low (all)
    pair_batch: int = 16             # rm, po: pairs per step (2x sequences)
    rm_iters: int = 400              # rm: optimizer steps
    rm_lr: float = 3e-4              # rm: peak lr
    rm_pool: str = 'mean'            # rm: the head reads the 'last' real token (the paper's) or the continuation's 'mean'
    po_iters: int = 300              # po: optimizer steps
    po_lr: float = 1e-4              # po: peak lr
    loss: str = 'madpo'              # po: dpo, cdpo, ipo, bdpo or madpo
    beta: float = 0.1                # po: every loss (beta-DPO's beta0)
    label_smoothing: float = 0.1     # po, cdpo: eps, the assumed probability that a label is flipped
    ipo_average: bool = False        # po, ipo: per-token-averaged log-ratios (TRL) instead of summed (MADPO's baseline)
    bdpo_alpha: float = 0.6          # po, bdpo
    bdpo_keep: float = 0.8           # po, bdpo: fraction of the batch kept
    bdpo_momentum: float = 0.9       # po, bdpo
    c_max: float = 4.0               # po, madpo: c_min = 1/c_max
    lam: float = 1.0                 # po, madpo
    tau: float = math.log(999)       # po, madpo

    def __post_init__(self):
        require(self.stage in ('sft', 'pairs', 'rm', 'po', 'eval', 'compare', 'all'),
                f"--stage must be sft, pairs, rm, po, eval, compare or all, got '{self.stage}'")
        require(self.loss in LOSSES and set(self.losses) <= set(LOSSES), f"--loss(es) must be among {', '.join(LOSSES)}")
        require(self.tier in TIERS and set(self.tiers) <= set(TIERS), f"--tier(s) must be among {', '.join(TIERS)}")
        require(self.init_from in ('scratch', 'resume'), f"--init_from must be scratch or resume, got '{self.init_from}'")
        require(self.rm_pool in ('last', 'mean'), f"--rm_pool must be last or mean, got '{self.rm_pool}'")
        require(self.scorer in ('vader', 'transformer'), f"--scorer must be vader or transformer, got '{self.scorer}'")
        require(self.c_max > 1, f'--c_max must be > 1 (c_min = 1/c_max), got {self.c_max}')
        require(0 <= self.label_smoothing < 0.5, f'--label_smoothing must be in [0, 0.5), got {self.label_smoothing}')
        require(0 < self.bdpo_keep <= 1, f'--bdpo_keep must be in (0, 1], got {self.bdpo_keep}')
        require(0 <= self.bdpo_momentum < 1, f'--bdpo_momentum must be in [0, 1), got {self.bdpo_momentum}')
        for key in ('n_pairs', 'val_pairs', 'n_eval', 'pair_batch', 'sft_batch_size', 'sft_iters', 'rm_iters', 'po_iters',
                    'prompt_len', 'max_new', 'beta', 'sft_lr', 'rm_lr', 'po_lr', 'temperature', 'lam'):
            require(getattr(self, key) > 0, f'--{key} must be positive, got {getattr(self, key)}')
        block_size = train_config(self, 'sft').model_dims()['block_size']  # the loop's own checks run here too
        require(self.prompt_len + self.max_new <= block_size,
                f'--prompt_len + --max_new ({self.prompt_len + self.max_new}) must be <= --block_size ({block_size})')


def folder(cfg, stage):
    """A stage's folder: <out_dir>/seed<seed>/{sft, pairs, rm_<tier>, po_<loss>_<tier>, eval}."""
    name = {'rm': f'rm_{cfg.tier}', 'po': f'po_{cfg.loss}_{cfg.tier}'}.get(stage, stage)
    return Path(cfg.out_dir) / f'seed{cfg.seed}' / name


def train_config(cfg, stage):
    """The shared loop's full TrainConfig for the sft, rm or po stage (saved in its checkpoints): its folder,
    budget in steps, lr and batch; rm and po start from the SFT weights (or resume their own)."""
    iters, lr, batch_size = {'sft': (cfg.sft_iters, cfg.sft_lr, cfg.sft_batch_size),
                             'rm': (cfg.rm_iters, cfg.rm_lr, cfg.pair_batch), 'po': (cfg.po_iters, cfg.po_lr, cfg.pair_batch)}[stage]
    init_from = cfg.init_from if stage == 'sft' or cfg.init_from == 'resume' else str(folder(cfg, 'sft') / 'ckpt.pt')
    return train.TrainConfig(
        out_dir=str(folder(cfg, stage)), init_from=init_from, overwrite=cfg.overwrite, seed=cfg.seed, dataset=cfg.dataset,
        batch_size=batch_size, model=cfg.model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        block_size=cfg.block_size, budget_unit='iters', budget=float(iters), lr=lr, eval_interval=cfg.eval_interval,
        log_interval=cfg.log_interval, sample_tokens=0, device=cfg.device, dtype=cfg.dtype, compile_loss=cfg.compile_loss)


# -----------------------------------------------------------------------------
# the stages; each writes done.json (its results and wall time) in its folder

def train_stage(cfg, stage, objective=None):
    result = train.train(train_config(cfg, stage), objective)
    return {'val_loss': result['val_loss'], 'interrupted': result['interrupted'], **getattr(objective, 'val_metrics', {})}


def stage_sft(cfg, device):
    return train_stage(cfg, 'sft')


def stage_pairs(cfg, device):
    sft = train.load_model(folder(cfg, 'sft') / 'ckpt.pt', device, cfg.compile_loss)
    return build_pairs(cfg, sft, device, folder(cfg, 'pairs'))


def stage_rm(cfg, device):
    objective = RewardObjective(cfg, folder(cfg, 'pairs') / f'{cfg.tier}.pt')
    result = train_stage(cfg, 'rm', objective)
    if not result['interrupted']:  # what MADPO's po stage reads (the head is also in ckpt.pt['objective'])
        torch.save({'head': objective.head.state_dict(), 'rm_pool': objective.pool}, folder(cfg, 'rm') / 'head.pt')
    return result


def stage_po(cfg, device):
    pairs, sft, rm = folder(cfg, 'pairs') / f'{cfg.tier}.pt', folder(cfg, 'sft') / 'ckpt.pt', folder(cfg, 'rm')
    return train_stage(cfg, 'po', PreferenceObjective(cfg, pairs, sft, rm))


def stage_eval(cfg, device):
    """Reward, KL and win rate of the SFT model and every finished po run (data/reviews/evaluate.py)."""
    sft = folder(cfg, 'sft')
    policies = ((d.name.removeprefix('po_'), train.load_model(d / 'ckpt.pt', device, cfg.compile_loss))
                for d in sorted(sft.parent.glob('po_*')) if (d / 'done.json').exists())
    return evaluate_policies(cfg, train.load_model(sft / 'ckpt.pt', device, cfg.compile_loss), policies, batched_logps, device)


def stage_compare(cfg):
    """The method x tier table of mean reward, KL and win rate; the RM's held-out accuracy per tier; the
    wall time per stage. Printed, and written to compare.md (and compare.png with matplotlib)."""
    root, methods = Path(cfg.out_dir), ('sft',) + LOSSES
    evals = [json.loads(p.read_text()) for p in sorted(root.glob('seed*/eval/done.json'))]
    require(evals, f'no finished eval under {root}/seed*/eval: run the eval stage first')
    lines, points = reward_table(evals, methods)
    lines += ['', *HEADER]
    for key in ('acc', 'true_acc'):
        accs = [[json.loads(p.read_text())[key] for p in root.glob(f'seed*/rm_{t}/done.json')] for t in TIERS]
        lines.append(f'| RM held-out {key} | ' + ' | '.join(f'{np.mean(a):.3f}' if a else '-' for a in accs) + ' |')
    walls = {}
    for p in root.glob('seed*/*/done.json'):
        walls.setdefault(p.parent.name.split('_')[0], []).append(json.loads(p.read_text())['wall_s'])
    lines += ['', 'wall time per stage run (s, mean): '
              + ', '.join(f'{k} {np.mean(v):.0f} (x{len(v)})' for k, v in sorted(walls.items()))]
    text = '\n'.join(lines)
    print(text)
    (root / 'compare.md').write_text(text + '\n')
    plot(points, methods, root / 'compare.png')
    return text


STAGES = {'sft': stage_sft, 'pairs': stage_pairs, 'rm': stage_rm, 'po': stage_po, 'eval': stage_eval}


def run_stage(cfg, name, skip_done=False):
    """Run one stage; write its done.json (results, wall time, keys). In --stage=all a finished stage is
    skipped and an interrupted one resumed (unless --overwrite=True)."""
    out = folder(cfg, name)
    if skip_done and not cfg.overwrite:
        if (out / 'done.json').exists():
            print(f'{out}: done, skipped')
            return json.loads((out / 'done.json').read_text())
        if (out / 'ckpt.pt').exists():
            cfg = dataclasses.replace(cfg, init_from='resume')
    print(f'=== {name} -> {out}')
    t0 = time.time()
    result = STAGES[name](cfg, train.setup_device(cfg).device)
    if result.get('interrupted'):
        raise UserError(f'{name} was interrupted: rerun with --init_from=resume (--stage=all resumes by itself)')
    # the stage's madpo keys (its checkpoint holds only the loop's TrainConfig)
    result.update(wall_s=time.time() - t0, config=dataclasses.asdict(cfg))
    out.mkdir(parents=True, exist_ok=True)
    (out / 'done.json').write_text(json.dumps(result, indent=1))
    return result


def run_all(cfg):
    for seed in cfg.seeds:
        c = dataclasses.replace(cfg, seed=seed)
        run_stage(c, 'sft', skip_done=True)
        run_stage(c, 'pairs', skip_done=True)
        for tier in c.tiers:
            run_stage(dataclasses.replace(c, tier=tier), 'rm', skip_done=True)
            for loss in c.losses:
                run_stage(dataclasses.replace(c, tier=tier, loss=loss), 'po', skip_done=True)
        run_stage(c, 'eval')  # always: it scores every policy that is there now
    return stage_compare(cfg)


def main(cfg):
    require(int(os.environ.get('WORLD_SIZE', 1)) == 1, 'madpo.py runs in one process: start it with python, not torchrun')
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.dataset == 'reviews/imdb' and not (data_dir(cfg.dataset, 'byte') / 'meta.json').exists():
        raise UserError('no prepared IMDb reviews: run `python data/reviews/prepare.py --source=imdb` (needs network)')
    if cfg.dataset == 'reviews' and not (data_dir('reviews', 'byte') / 'meta.json').exists():
        from data.reviews.prepare import PrepareConfig, prepare
        print('preparing the generated review corpus in data/reviews/byte (once)')
        prepare(PrepareConfig())
    if cfg.stage == 'all':
        return run_all(cfg)
    if cfg.stage == 'compare':
        return stage_compare(cfg)
    return run_stage(cfg, cfg.stage)


if __name__ == '__main__':
    cli(main, MadpoConfig)
