"""Preference optimization on an offline sentiment task: DPO, cDPO, IPO, beta-DPO and MADPO, one run per stage.

MADPO: "Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference Optimization"
(arXiv 2510.05342 v1, Oct 2025). Baselines: DPO (Rafailov et al. 2023, arXiv 2305.18290) and its
conservative variant with label smoothing (cDPO), IPO (Azar et al. 2023, arXiv 2310.12036), beta-DPO
(Wu et al. 2024, arXiv 2407.08639).
The idea: a Bradley-Terry reward model gives each preference pair a margin m; MADPO multiplies the pair's
DPO loss by a detached weight w(m), which amplifies the target margin of hard pairs (small |m|) and damps
easy ones (large m), instead of one beta for every pair (DPO) or for a batch (beta-DPO).

The losses, per pair (x, y_w, y_l), with h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)):
    DPO       -log sigmoid(beta h)
    cDPO      -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)      (each label flipped with prob. eps)
    IPO       (h - 1/(2 beta))^2                                              (h from summed or averaged log-ratios)
    beta-DPO  DPO at beta = beta0 (1 + alpha (M - M0)) >= 1e-3, on 80% of the batch drawn around the running
              mean margin M0; M = the kept pairs' mean h
    MADPO     w(m) * -log sigmoid(beta h), w detached; w(m) = sigmoid(c(|m|) m) / sigmoid(m) for m > -tau, else 1,
              c(a) = c_min + (c_max - c_min) / (1 + K exp(lam (a - tau))), K = (c_max - 1)/(1 - c_min), c_min = 1/c_max
              tau: the paper's ln 999, or with --tau_quantile=q the q-quantile of the pairs' |m| (margin_tau)

The task (the paper's, offline; data/reviews/): continue a review opening positively, ground truth r = 3 *
VADER compound(prompt + continuation) in [-3, 3], Bradley-Terry labels, pair tiers high / medium / low. One
run per stage, each reading the files of the ones before under --out_dir/seed<seed>/ (`--help` says which
stage reads which key); the study (seeds x tiers x arms x betas, rewards at matched KL): python -m studies.madpo

    python madpo.py --stage=sft                        # the SFT policy, also the frozen reference: sft/ckpt.pt
    python madpo.py --stage=pairs                      # labelled pairs of every tier: pairs/<tier>.pt
    python madpo.py --stage=rm --tier=low              # MADPO's reward model (reward_model.py): rm_low/rm.pt
    python madpo.py --stage=po --loss=ipo --tier=low   # one preference run, scored along training: po_ipo_b0.1_low/
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import runs
import train
from configurator import Interrupted, UserError, check_ranges, cli, key, require, require_writable, stop_signal_name
from data.loader import EPOCH_SEEDS, MAX_SEED, atomic_write_bytes, file_sha256
from data.reviews.evaluate import PolicyScorer
from data.reviews.pairs import TIERS, batched_logps, build_pairs, sequence_logps
from data.reviews.prepare import ensure_prepared
from model import evaluating
from reward_model import PairObjective, RewardObjective


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


def margin_tau(m, tau, quantile):
    """MADPO's tau: the given margin magnitude, or with quantile > 0 that quantile of the pairs' |m|. The paper's
    ln 999 assumes margins that reach it; where they do not (|m| <= 6 here), c(|m|) > 1 for every pair and no
    easy pair is damped, so tau at the median |m| makes both branches act: w < 1 above it, w > 1 below."""
    return torch.quantile(m.abs().double().cpu(), quantile).item() if quantile > 0 else tau


def weight_summary(w, tau):
    """What MADPO's weights did to the pairs: tau, quantiles, mean, the fractions damped (w < 1) and amplified
    (w > 1), and a histogram of w over [0, 2) (w < 2 always: sigmoid(cm) <= 1, sigmoid(m) >= 1/2 for m >= 0)."""
    q = torch.quantile(w, torch.tensor([0, 0.1, 0.5, 0.9, 1.0], dtype=w.dtype)).tolist()
    return {'tau': tau, 'quantiles_0_10_50_90_100': q, 'mean': w.mean().item(),
            'frac_damped': (w < 1).float().mean().item(), 'frac_amplified': (w > 1).float().mean().item(),
            'histogram_0_to_2_by_0.2': torch.histc(w, 10, 0, 2).int().tolist()}


def oracle_margins(r, noise=0.0, seed=0):
    """MADPO's m from the true rewards r (n, 2) = [chosen, rejected]: r_w - r_l, plus noise * N(0, 1) per
    pair drawn from a generator seeded by seed (the same noise for every run of that seed)."""
    z = torch.randn(len(r), generator=torch.Generator().manual_seed(seed), dtype=r.dtype)
    return r[:, 0] - r[:, 1] + noise * z


# -----------------------------------------------------------------------------
# the po objective (the reward model and the pair batches: reward_model.py)

class PreferenceObjective(PairObjective):
    """DPO, cDPO, IPO, beta-DPO or MADPO on the policy; reference log-probs (and MADPO's margins) precomputed.
    With a scorer, each eval also scores the policy (data/reviews/evaluate.py): a point of its reward-vs-KL curve."""

    def __init__(self, cfg, pairs_path, ref_ckpt, rm_dir=None, scorer=None):
        super().__init__(cfg, pairs_path)
        self.ref_ckpt, self.rm_dir, self.scorer, self.curve = Path(ref_ckpt), rm_dir, scorer, []
        self.ref_cache = self.pairs_path.with_name(self.pairs_path.stem + '_ref_logps.bin')  # beside the pairs
        self.bdpo = BetaDPO(cfg.beta, cfg.bdpo_alpha, cfg.bdpo_keep, cfg.bdpo_momentum)
        self.rng = torch.Generator().manual_seed(cfg.seed)  # beta-DPO's draws; its own, so a resume is exact

    def setup(self, ctx):
        super().setup(ctx)
        self.train_set = tuple(x[:self.cfg.po_pairs] for x in self.train_set)  # the reward model saw them all
        self.val_set = tuple(x[:self.cfg.po_val_pairs] for x in self.val_set)
        sizes = [len(self.train_set[0]), len(self.val_set[0])]
        self.ref_train, self.ref_val = self.reference_logps().to(self.device).split(sizes)
        if self.scorer:
            self.curve = [{'step': 0, **self.scorer.reference_point()}]  # a resume restores the later points
        if self.cfg.loss == 'madpo':
            m = self.pair_margins()
            self.tau = margin_tau(m, self.cfg.tau, self.cfg.tau_quantile)
            self.weights = madpo_weight(m, self.cfg.c_max, self.cfg.lam, self.tau)
            summary = weight_summary(self.weights.cpu(), self.tau)
            atomic_write_bytes(ctx.out_dir / 'madpo_weights.json', json.dumps(summary, indent=1).encode())
            ctx.rt.print(f"MADPO weights (tau {self.tau:.3f}): damped {summary['frac_damped']:.3f}, amplified "
                         f"{summary['frac_amplified']:.3f} of the pairs, mean {summary['mean']:.3f}")

    def pair_margins(self):
        """m per training pair (--margins): the trained reward model's, or the oracle's (noisy: plus noise)."""
        if self.cfg.margins != 'rm':
            noise = self.cfg.margin_noise if self.cfg.margins == 'noisy' else 0.0
            return oracle_margins(self.train_set[2], noise, self.cfg.seed).to(self.device)
        rm = RewardObjective(self.cfg, self.pairs_path)
        rm.load_frozen(self.rm_dir, self.device)
        return rm.margins(rm.model, *self.train_set[:2])

    def reference_logps(self):
        """Summed reference log-probs of [chosen, rejected] for every pair (n, 2): computed once per reference,
        pairs file and split, and cached next to the pairs (runs.save_cache); a cache that is missing, stale,
        damaged or edited (its checksum differs) is computed again."""
        try:
            saved, _ = runs.load_cache(self.ref_cache, self.ref_identity(), 'reference log-probs', 'computing them now')
            return torch.from_numpy(np.array(saved))
        except UserError as e:
            print(e)
        ref = runs.load_model(self.ref_ckpt, self.device, self.cfg.compile_loss)
        seq = torch.cat([self.train_set[0], self.val_set[0]])
        lens = torch.cat([self.train_set[1], self.val_set[1]])
        report, parts = runs.progress('reference log-probs', len(seq), 'pairs'), []
        for i in range(0, len(seq), 256):  # (n, 2): chosen, rejected
            parts.append(torch.stack([batched_logps(ref, seq[i:i + 256, k], self.cfg.prompt_len, lens[i:i + 256, k])
                                      for k in (0, 1)], 1).cpu())
            report(i + len(parts[-1]))
        logps = torch.cat(parts)
        runs.save_cache(self.ref_cache, logps.numpy(), self.ref_identity())  # a tier's parallel runs too: checksummed
        return logps

    def ref_identity(self):
        """What decides the reference log-probs: the reference, the pairs, the split used and the device."""
        return {'ref_ckpt_sha256': file_sha256(self.ref_ckpt), 'pairs_sha256': file_sha256(self.pairs_path),
                'n_train': len(self.train_set[0]), 'n_val': len(self.val_set[0]), 'prompt_len': self.cfg.prompt_len,
                'device': self.device.type}

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
        """Held-out DPO loss at beta (the same yardstick for every loss), the preference accuracy, and
        with a scorer the policy's reward and KL at this step (appended to the curve)."""
        seq, lens = self.val_set[:2]
        with evaluating(model):
            h = torch.cat([self.margins_h(model, seq[i:i + 64], lens[i:i + 64], self.ref_val[i:i + 64])
                           for i in range(0, len(seq), 64)])
        self.val_metrics = {'pref_acc': (h > 0).float().mean().item(), 'margin': h.mean().item()}
        if self.scorer:
            self.curve.append({'step': ctx.step, **self.scorer(model)})
            self.val_metrics.update(self.curve[-1], curve=self.curve)
            ctx.rt.print(f"step {ctx.step}: reward {self.curve[-1]['reward']:.3f}, KL {self.curve[-1]['kl']:.2f}")
        return dpo_loss(h, self.cfg.beta).mean().item()

    def state_dict(self):
        return {**super().state_dict(), 'bdpo': self.bdpo.state_dict(), 'rng': self.rng.get_state(), 'curve': self.curve}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.bdpo.load_state_dict(state['bdpo'])
        self.rng.set_state(state['rng'])
        self.curve = state['curve']


# -----------------------------------------------------------------------------
# config: one stage's keys; each stage builds its own train.TrainConfig from them

STAGES = ('sft', 'pairs', 'rm', 'po')
LOSSES = ('dpo', 'cdpo', 'ipo', 'bdpo', 'madpo')
MARGINS = ('rm', 'oracle', 'noisy')


@dataclass(frozen=True)
class MadpoConfig:
    """One stage's keys; each comment starts with the stages that read the key (READS lists them)."""
    stage: str = key('sft', STAGES)  # the stage to run (the whole study: python -m studies.madpo)
    out_dir: str = key('out/madpo', 'path')  # every stage: <out_dir>/seed<seed>/{sft,pairs,rm_<tier>,po_<arm>_b<beta>_<tier>}
    seed: int = key(0, '>=0')        # every stage: each seed has its own SFT model, pairs, reward models and runs
    init_from: str = key('scratch', ('scratch', 'resume'))  # sft, rm, po: resume continues the stage's checkpoint
    overwrite: bool = False          # every stage: replace what the stage's folder holds (a run; the pairs)
    threads: int = key(0, '>=0')     # every stage: torch CPU threads; 0 = torch's default (1 is faster on a busy machine)
    dataset: str = 'reviews'         # every stage: data/reviews/byte, generated on first use (or reviews/imdb)
    scorer: str = key('vader', ('vader', 'transformer'))  # pairs, po: ground truth (transformer needs network)
    model: str = 'tiny'              # sft (rm and po start from its checkpoint): a preset in model.PRESETS
    n_layer: int = 0                 # sft: 0 = the preset's
    n_head: int = 0                  # sft: 0 = the preset's
    n_embd: int = 0                  # sft: 0 = the preset's
    block_size: int = 96             # sft: >= prompt_len + max_new
    device: str = 'auto'             # every stage: auto, cpu, cuda, cuda:1, mps
    dtype: str = 'auto'              # sft, rm, po: auto (bf16 on GPU, else float32), float32, bfloat16
    compile_loss: bool = False       # every stage: eager kernels (tiny model, many short runs: compile is a startup cost)
    eval_interval: int = key(500, '>0')  # sft: steps between evals and checkpoints
    rm_eval_interval: int = key(250, '>0')  # rm: steps between evals (early stopping) and checkpoints
    log_interval: int = key(25, '>0')    # sft, rm, po
    sft_iters: int = key(2000, '>0')     # sft: optimizer updates
    sft_lr: float = key(2e-3, '>0')      # sft: peak lr (cosine, AdamW: train.TrainConfig's defaults)
    sft_batch_size: int = key(32, '>0')  # sft: sequences per step
    prompt_len: int = key(24, '>0')      # sft (block_size), pairs, rm, po: prompt bytes (a review's opening)
    max_new: int = key(72, '>0')         # sft (block_size), pairs, po: continuation bytes, eos included
    temperature: float = key(1.0, '>0')  # pairs, po: sampling; 1 keeps the KL estimate honest
    n_pairs: int = key(20000, '>0')      # pairs: training pairs per tier (one prompt each): rm trains on all of them
    val_pairs: int = key(1000, '>0')     # pairs: held-out pairs per tier (RM early stopping, accuracy and ceiling; PO held-out loss)
    n_eval: int = key(160, '>0')         # po: held-out prompts scored at each point of the curve
    tier: str = key('high', tuple(TIERS))  # rm, po: high (on-policy), medium (half off-policy), low (all)
    pair_batch: int = key(16, '>0')      # rm, po: pairs per step (2x sequences)
    rm_iters: int = key(2000, '>0')      # rm: optimizer updates (the best eval step is kept)
    rm_lr: float = key(1e-4, '>0')       # rm: peak lr (tuning the whole model: 3e-4 learns slower, 1e-3 not at all)
    rm_pool: str = key('sum', ('last', 'mean', 'sum'))  # rm: the per-position scores' sum or mean over the continuation, or the last
    rm_head: int = key(256, '>=0')       # rm: width of the per-position MLP head; 0 = linear
    rm_freeze: bool = False          # rm: train the head only, on the frozen SFT backbone (with --rm_lr=3e-3; less accurate)
    po_pairs: int = key(3000, '>0')      # po: trains on the first po_pairs training pairs
    po_val_pairs: int = key(250, '>0')   # po: held-out pairs of its DPO loss and preference accuracy (the first ones)
    po_iters: int = key(120, '>0')       # po: optimizer updates
    po_lr: float = key(5e-5, '>0')       # po: peak lr (3e-4 reaches KL ~100 nats in 30 steps at beta 0.03)
    po_points: int = key(4, '>0')        # po: curve points along training (evals every po_iters // po_points steps)
    loss: str = key('madpo', LOSSES)     # po: dpo, cdpo, ipo, bdpo or madpo
    beta: float = key(0.1, '>0')         # po: every loss (beta-DPO's beta0)
    label_smoothing: float = key(0.1, '[0, 0.5)')  # po, cdpo: eps, the assumed probability that a label is flipped
    ipo_average: bool = False        # po, ipo: per-token-averaged log-ratios (TRL) instead of summed (MADPO's baseline)
    bdpo_alpha: float = key(0.6, '>=0')  # po, bdpo: beta grows with the kept margin (< 0 would invert it; 0: beta0)
    bdpo_keep: float = key(0.8, '(0, 1]')      # po, bdpo: fraction of the batch kept
    bdpo_momentum: float = key(0.9, '[0, 1)')  # po, bdpo
    margins: str = key('rm', MARGINS)  # po, madpo: m from the trained 'rm', the true r_w - r_l ('oracle'), or 'noisy'
    margin_noise: float = key(1.0, '>=0')      # po, madpo, noisy: std of the Gaussian noise added to the oracle's m
    c_max: float = key(4.0, '>1')    # po, madpo: c_min = 1/c_max
    lam: float = key(1.0, '>0')      # po, madpo
    tau: float = key(math.log(999), '>0')  # po, madpo: c(tau) = 1, w = 1 for m <= -tau: a margin magnitude
    tau_quantile: float = key(0.0, '[0, 1)')  # po, madpo: > 0 sets tau to this quantile of the pairs' |m| (--tau unused)

    def __post_init__(self):
        check_ranges(self)
        block_size = train_config(self, 'sft').model_dims()['block_size']  # the loop's own checks run here too
        require(self.prompt_len + self.max_new <= block_size,
                f'--prompt_len + --max_new ({self.prompt_len + self.max_new}) must be <= --block_size ({block_size})')
        require(self.po_points <= self.po_iters, f'--po_points ({self.po_points}) must be <= --po_iters ({self.po_iters})')
        self.check_sizes()

    def check_sizes(self):
        """Counts against their real range and the memory they imply, before anything is built."""
        require(self.seed <= MAX_SEED, f'--seed={self.seed} is beyond what the pair order takes (seed x {EPOCH_SEEDS:,} + epoch '
                                       f'seeds a generator, below 2**64): give a seed <= {MAX_SEED:,}')
        cpus = os.cpu_count() or 1
        require(self.threads <= cpus, f'--threads={self.threads} is more than the {cpus} CPUs here: give at most {cpus} '
                                      f'(0 = torch\'s default)')
        require(self.val_pairs >= 2, f'--val_pairs={self.val_pairs}: the reward model selects its step on one half of the '
                                     f'held-out pairs and reports on the other: give at least 2')
        for name, n, most, of in (('po_pairs', self.po_pairs, self.n_pairs, 'n_pairs'),  # po reads the pairs' keys too
                                  ('po_val_pairs', self.po_val_pairs, self.val_pairs, 'val_pairs')):
            require(self.stage in ('sft', 'pairs', 'rm') or n <= most, f'--{name}={n:,} is more than the --{of}={most:,} '
                                                                       f'pairs the pairs stage writes: give at most {most:,}')
        free = runs.free_memory(torch.device('cpu'))
        for name, (n, bytes_each) in host_bytes(self).items():
            fits = free // bytes_each - (n - getattr(self, name))  # n_pairs: the val_pairs are built with them
            require(n * bytes_each <= free, f'--{name}={getattr(self, name):,} needs about {n * bytes_each / 2**30:,.1f} GiB '
                                            f'of memory ({bytes_each:,} bytes each), more than is free: give at most {fits:,}')


def host_bytes(cfg):
    """{key: (count, bytes each)}: what a count holds in memory at once, as the pairs stage, the scorer and the
    reward model's head allocate it (tokens are int64 throughout)."""
    P, M, C = cfg.prompt_len, cfg.max_new, train_config(cfg, 'sft').model_dims()['n_embd']
    return {'n_pairs': (cfg.n_pairs + cfg.val_pairs, 8 * (P + 13 * M) + 1024),  # prompt, 3 sides, the tiers' copies, texts
            'n_eval': (cfg.n_eval, 8 * (3 * P + 6 * M) + 512),  # prompts, policy and reference samples, their sequences
            'rm_head': (cfg.rm_head, 16 * C + 32 * cfg.pair_batch * (P + M))}  # weights, grads, Adam; 2B sequences' activations


# What each stage reads besides stage, out_dir and seed (threads, init_from and overwrite say how it runs, not
# what it computes). A stage's result is decided by these keys and those of the stages whose files it reads.
TRAINING = ('dataset', 'device', 'dtype', 'compile_loss', 'log_interval')  # sft, rm, po: the shared loop's
READS = {
    'sft': TRAINING + ('model', 'n_layer', 'n_head', 'n_embd', 'block_size', 'prompt_len', 'max_new', 'eval_interval',
                       'sft_iters', 'sft_lr', 'sft_batch_size'),
    'pairs': ('dataset', 'device', 'compile_loss', 'scorer', 'prompt_len', 'max_new', 'temperature', 'n_pairs', 'val_pairs'),
    'rm': TRAINING + ('rm_eval_interval', 'prompt_len', 'tier', 'pair_batch', 'rm_iters', 'rm_lr', 'rm_pool', 'rm_head',
                      'rm_freeze'),
    'po': TRAINING + ('scorer', 'prompt_len', 'max_new', 'temperature', 'n_eval', 'tier', 'pair_batch', 'po_pairs',
                      'po_val_pairs', 'po_iters', 'po_lr', 'po_points', 'loss', 'beta', 'label_smoothing', 'ipo_average',
                      'bdpo_alpha', 'bdpo_keep', 'bdpo_momentum', 'margins', 'margin_noise', 'c_max', 'lam', 'tau',
                      'tau_quantile')}


def inputs(cfg, stage):
    """The stages whose files this stage reads (po reads the reward model only for MADPO's learned margins)."""
    learned = cfg.loss == 'madpo' and cfg.margins == 'rm'
    return {'sft': (), 'pairs': ('sft',), 'rm': ('sft', 'pairs'), 'po': ('sft', 'pairs') + ('rm',) * learned}[stage]


def stage_keys(cfg, stage):
    """{key: value} of what decides this stage's result: its own keys and those of every stage it reads."""
    names = ('seed',) + READS[stage] + sum((READS[s] for s in inputs(cfg, stage)), ())
    return {name: getattr(cfg, name) for name in dict.fromkeys(names)}


def method_name(cfg):
    """The arm a po config runs (madpo names c_max, its margins unless the RM's, and tau's quantile if set): its
    folder's name."""
    if cfg.loss == 'madpo':
        return (f'madpo{cfg.c_max:g}' + ('' if cfg.margins == 'rm' else f'_{cfg.margins}')
                + (f'_tq{cfg.tau_quantile:g}' if cfg.tau_quantile else ''))
    return 'ipo_avg' if cfg.loss == 'ipo' and cfg.ipo_average else cfg.loss


def folder(cfg, stage):
    """A stage's folder: <out_dir>/seed<seed>/{sft, pairs, rm_<tier>, po_<arm>_b<beta>_<tier>}."""
    name = {'rm': f'rm_{cfg.tier}', 'po': f'po_{method_name(cfg)}_b{cfg.beta:g}_{cfg.tier}'}.get(stage, stage)
    return Path(cfg.out_dir) / f'seed{cfg.seed}' / name


def require_finished(cfg, stage):
    """The later stages start from the SFT model (po with --margins=rm reads the reward model too): a stopped or
    unfinished run would pass its weights off as the finished model's, so it is refused in one line. A run
    that starts again removes its done.json first (train.py), so a rerun killed midway is not finished either."""
    out = folder(cfg, stage)
    why = 'it was stopped' if (out / 'stopped.json').exists() else 'no done.json'
    again = ' --init_from=resume' if (out / 'ckpt.pt').exists() else ''
    tier = f' --tier={cfg.tier}' if stage == 'rm' else ''
    require((out / 'done.json').is_file(), f'{out} holds no finished {stage.upper()} run ({why}): finish it first (python '
                                           f'madpo.py --stage={stage}{tier}{again} with the same --out_dir and --seed)')


def train_config(cfg, stage):
    """The shared loop's full TrainConfig for the sft, rm or po stage (saved in its checkpoints): its folder,
    budget in steps, lr and batch; rm and po start from the SFT weights (or resume their own)."""
    iters, lr, batch_size = {'sft': (cfg.sft_iters, cfg.sft_lr, cfg.sft_batch_size), 'rm': (cfg.rm_iters, cfg.rm_lr, cfg.pair_batch),
                             'po': (cfg.po_iters, cfg.po_lr, cfg.pair_batch)}[stage]
    init_from = cfg.init_from if stage == 'sft' or cfg.init_from == 'resume' else str(folder(cfg, 'sft') / 'ckpt.pt')
    eval_interval = {'sft': cfg.eval_interval, 'rm': cfg.rm_eval_interval, 'po': max(1, cfg.po_iters // cfg.po_points)}[stage]
    return train.TrainConfig(
        out_dir=str(folder(cfg, stage)), init_from=init_from, overwrite=cfg.overwrite, seed=cfg.seed, dataset=cfg.dataset,
        batch_size=batch_size, model=cfg.model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        block_size=cfg.block_size, budget_unit='iters', budget=float(iters), lr=lr, eval_interval=eval_interval,
        log_interval=cfg.log_interval, sample_tokens=0, device=cfg.device, dtype=cfg.dtype, compile_loss=cfg.compile_loss)


# -----------------------------------------------------------------------------
# the stages; each ends with config.json (this command's keys) and done.json (its results) in its folder

def train_stage(cfg, stage, objective=None):
    result = train.train(train_config(cfg, stage), objective)
    return {'val_loss': result['val_loss'], 'interrupted': result['interrupted'], **getattr(objective, 'val_metrics', {})}


def stage_pairs(cfg, device):
    """Build the pairs in pairs/partial/ and move them in only once complete: until then the old pairs (which
    reward models and po runs were trained on) and their record stay as they were, whatever fails first (the
    SFT checkpoint, the scorer, the sampling, Ctrl-C); replacing them at all takes --overwrite=True."""
    out = folder(cfg, 'pairs')
    # the tiers' files count without a done.json too: the rm and po stages read them, recorded or not
    held = [p.name for p in [out / 'done.json'] + [out / f'{t}.pt' for t in TIERS] if p.exists()]
    require(cfg.overwrite or not held, f'{out} already holds pairs ({", ".join(held)}): --overwrite=True to replace '
                                       f'them, or another --out_dir or --seed')
    require_writable(out / 'done.json')
    partial = out / 'partial'
    shutil.rmtree(partial, ignore_errors=True)  # a killed build's
    try:
        sft = runs.load_model(folder(cfg, 'sft') / 'ckpt.pt', device, cfg.compile_loss)
        results = build_pairs(cfg, sft, device, partial, runs.progress)  # the scorer is loaded first thing
        move_in(partial, out)
    except KeyboardInterrupt:  # nothing to resume: a build starts over (a move cut short left tiers without a record)
        raise Interrupted(f'pairs stopped by {stop_signal_name()} before they were recorded: rerun it with '
                          f'--overwrite=True to build them') from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return results


def move_in(partial, out):
    """The complete new pairs into out: the old record goes first, so that a move cut short leaves files that no
    done.json vouches for (never new pairs passing for the old ones). The reference log-prob caches stay: their
    identity holds the pairs' sha256, so a cache of the old pairs is computed again, not used."""
    for name in ('done.json', 'config.json'):
        (out / name).unlink(missing_ok=True)
    for path in sorted(partial.iterdir()):
        os.replace(path, out / path.name)


def stage_rm(cfg, device):
    objective = RewardObjective(cfg, folder(cfg, 'pairs') / f'{cfg.tier}.pt')
    result = train_stage(cfg, 'rm', objective)
    if not result['interrupted']:  # what MADPO's po stage reads
        objective.save(folder(cfg, 'rm') / 'rm.pt')
        print(f"RM {cfg.tier}: held-out accuracy {result['acc']:.3f} vs the labels (step {result['step']}), ceiling "
              f"{result['ceiling']:.3f} (the oracle reaches {result['oracle_acc']:.3f} on these labels)")
    return result


def stage_po(cfg, device):
    pairs, sft, rm = folder(cfg, 'pairs') / f'{cfg.tier}.pt', folder(cfg, 'sft') / 'ckpt.pt', folder(cfg, 'rm')
    scorer = PolicyScorer(cfg, runs.load_model(sft, device, cfg.compile_loss), device)
    return {'method': method_name(cfg), **train_stage(cfg, 'po', PreferenceObjective(cfg, pairs, sft, rm, scorer))}


STAGE_RUNS = {'sft': lambda cfg, device: train_stage(cfg, 'sft'), 'pairs': stage_pairs, 'rm': stage_rm, 'po': stage_po}


def record_config(cfg, out):
    """out/config.json: this command's keys (runs.run_info), which the lab compares before reusing or resuming
    the folder. A training stage's loop config, which train.py wrote there while it ran, stays as train_config."""
    info = runs.run_info(cfg)
    if cfg.stage != 'pairs':
        info['train_config'] = dataclasses.asdict(train_config(cfg, cfg.stage))
    atomic_write_bytes(out / 'config.json', json.dumps(info, indent=1).encode())


def main(cfg):
    """Run one stage; then config.json and done.json (its results, wall time and keys) in its folder. A stage
    stopped by Ctrl-C or SIGTERM says how to continue and exits 130 / 143 (cli), its checkpoint kept."""
    require(int(os.environ.get('WORLD_SIZE', 1)) == 1, 'madpo.py runs in one process: start it with python, not torchrun')
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ensure_prepared(cfg.dataset)
    out, t0 = folder(cfg, cfg.stage), time.time()
    print(f'=== stage {STAGES.index(cfg.stage) + 1}/{len(STAGES)}: {cfg.stage} -> {out}', flush=True)
    for earlier in inputs(cfg, cfg.stage):  # the pairs are checked where they are read, naming the tier's file
        if earlier != 'pairs':
            require_finished(cfg, earlier)
    # train.train locks a training stage's folder while it trains; the pairs stage trains nothing, so locks its own
    with runs.locked_folder(out) if cfg.stage == 'pairs' else contextlib.nullcontext():
        result = STAGE_RUNS[cfg.stage](cfg, train.setup_device(cfg).device)
        (out / 'done.json').unlink(missing_ok=True)  # an earlier run's: never beside this run's config.json
        record_config(cfg, out)  # an interrupted run's too: the lab resumes a folder whose keys it records
        if result.get('interrupted'):
            raise Interrupted(f'{cfg.stage} stopped by {stop_signal_name()}, its checkpoint saved in {out}: rerun it with '
                              f'--init_from=resume to continue (the study resumes it by itself)')
        result.update(wall_s=time.time() - t0, config=dataclasses.asdict(cfg))
        atomic_write_bytes(out / 'done.json', json.dumps(result, indent=1).encode())
    print(f'done: {out.name} in {result["wall_s"]:.0f} s', flush=True)
    return result


if __name__ == '__main__':
    cli(main, MadpoConfig)
