"""How a policy is scored on madpo.py's sentiment task, and the study's frontiers and tables.

A policy is scored on held-out prompts, one sample each, drawn with the same generator seed for every
policy and for the SFT reference: the mean ground-truth reward (95% CI over prompts), the Monte-Carlo KL
to the reference (nats per sequence: the mean of log pi(y|x) - log ref(y|x) over the policy's own samples)
and the win rate against the reference's sample for the same prompt (ties count half). madpo.py scores
each po run at checkpoints along training, a curve of (KL, reward) points starting at the reference's.

A method's frontier in one tier and seed is the upper-left boundary of its points over every beta and
checkpoint: the best reward measured at a KL up to k. Reward at a matched KL k is read on it by linear
interpolation between frontier points (flat after its best point), and is 'not reached' when no point of
the method has KL >= k: no extrapolation. A table cell is the mean over seeds with a 95% t interval.
"""
from pathlib import Path

import numpy as np
import torch

from data.loader import NUMBER, DataError, atomic_write_bytes, read_result
from data.reviews.pairs import TIERS, batched_logps, decode, get_scorer, prompts_from, rewards, sample_many
from sweep import t_interval

DONE_FIX = 'delete it, or rerun that stage with --overwrite=True'
DONE_KEYS = {'rm': {'ceiling': NUMBER, 'acc': NUMBER}, 'po': {'method': str, 'config': dict, 'curve': list}}  # what is read back


class PolicyScorer:
    """Scores policies against a frozen reference on cfg.n_eval held-out prompts (the seed's own)."""

    def __init__(self, cfg, ref, device):
        self.cfg, self.ref, self.device = cfg, ref, device
        self.scorer = get_scorer(cfg.scorer)
        self.prompts = prompts_from(cfg, 'val', cfg.n_eval, self.scorer, seed=cfg.seed + 100).to(device)
        _, _, self.r_ref = self.sample(ref)

    def sample(self, policy):
        """One continuation per prompt with the fixed generator -> (continuations, lengths, rewards)."""
        conts, lens = sample_many(policy, self.prompts, self.cfg, torch.Generator(self.device).manual_seed(self.cfg.seed + 3))
        return conts, lens, rewards(self.scorer, self.prompts, conts, lens)

    def reference_point(self):
        reward, reward_ci = t_interval(self.r_ref.tolist())
        return {'reward': reward, 'reward_ci': reward_ci, 'kl': 0.0, 'kl_ci': 0.0, 'win_rate': 0.5}

    @torch.no_grad()
    def __call__(self, policy):
        conts, lens, r = self.sample(policy)
        seq, P = torch.cat([self.prompts, conts], 1), self.cfg.prompt_len
        kl = (batched_logps(policy, seq, P, lens) - batched_logps(self.ref, seq, P, lens)).cpu()
        (reward, reward_ci), (kl_mean, kl_ci) = t_interval(r.tolist()), t_interval(kl.tolist())
        win = ((r > self.r_ref).float() + 0.5 * (r == self.r_ref).float()).mean().item()
        return {'reward': reward, 'reward_ci': reward_ci, 'kl': kl_mean, 'kl_ci': kl_ci, 'win_rate': win,
                'example': decode(self.prompts[0].cpu(), conts[0].cpu(), lens[0])}


# -----------------------------------------------------------------------------
# frontiers and matched KL

def frontier(points):
    """The (kl, reward) points that no point with a KL as small or smaller beats, by increasing KL."""
    front = []
    for kl, r in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or r > front[-1][1]:
            front.append((kl, r))
    return front


def reward_at_kl(points, kl):
    """The frontier's reward at this KL (linear interpolation), or None when no point reaches the KL."""
    if not points or kl > max(k for k, _ in points):
        return None
    xs, ys = zip(*frontier(points))
    return float(np.interp(kl, xs, ys))


def load_runs(root):
    """{(method, tier, seed): [(kl, reward), ...]} over every beta's finished po run under root."""
    curves = {}
    for path in sorted(Path(root).glob('seed*/po_*/done.json')):
        run = read_result(path, DONE_KEYS['po'], DONE_FIX)
        points = all(isinstance(p, dict) and isinstance(p.get('kl'), NUMBER) and isinstance(p.get('reward'), NUMBER)
                     for p in run['curve'])
        if not (points and run['config'].get('tier') in TIERS and isinstance(run['config'].get('seed'), int)):
            raise DataError(f'{path} is damaged (its config tier and seed, or its curve of kl and reward points): {DONE_FIX}')
        key = (run['method'], run['config']['tier'], run['config']['seed'])
        curves.setdefault(key, []).extend((p['kl'], p['reward']) for p in run['curve'])
    return curves


def matched_kl_cell(per_seed):
    """'mean ± CI (n)' over the seeds, or 'not reached (j/n)' when some seed's frontier stops short."""
    got = [r for r in per_seed if r is not None]
    if not per_seed:
        return '-'
    if len(got) < len(per_seed):
        return f'not reached ({len(got)}/{len(per_seed)})'
    mean, ci = t_interval(got)
    return f'{mean:.2f} ± {ci:.2f} ({len(got)})' if len(got) > 1 else f'{mean:.2f} (1 seed)'


def matched_kl_table(curves, methods, kls):
    lines = []
    for kl in kls:
        lines += ['', f'reward at KL = {kl:g} nats (mean ± 95% CI over seeds, (seeds))', '',
                  '| method | ' + ' | '.join(TIERS) + ' |', '|---' * (len(TIERS) + 1) + '|']
        for method in methods:
            cells = [matched_kl_cell([reward_at_kl(pts, kl) for (m, t, _), pts in sorted(curves.items())
                                      if (m, t) == (method, tier)]) for tier in TIERS]
            if set(cells) != {'-'}:
                lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    return lines


def ceiling_table(root):
    """Per tier, over the seeds' rm runs: the Bradley-Terry ceiling, the oracle's accuracy on the same
    held-out labels, and the trained reward model's accuracy against the labels, the true order and in
    expectation over label draws (pairs.expected_accuracy: the gap to the ceiling without label noise)."""
    rows = {'ceiling': 'BT ceiling (expected)', 'oracle_acc': 'oracle on the labels', 'acc': 'RM acc vs labels',
            'true_acc': 'RM acc vs true order', 'gap': 'ceiling - RM acc', 'expected_acc': 'RM expected acc',
            'expected_gap': 'ceiling - RM expected acc'}
    lines = ['', '| held-out pairs | ' + ' | '.join(TIERS) + ' |', '|---' * (len(TIERS) + 1) + '|']
    runs = {t: [read_result(p, DONE_KEYS['rm'], DONE_FIX) for p in sorted(Path(root).glob(f'seed*/rm_{t}/done.json'))]
            for t in TIERS}
    for run in (r for tier_runs in runs.values() for r in tier_runs):
        run['gap'] = run['ceiling'] - run['acc']
        if 'expected_acc' in run:  # not in runs from before the key
            run['expected_gap'] = run['ceiling'] - run['expected_acc']
    for key, label in rows.items():
        cells = []
        for tier in TIERS:
            xs = [r[key] for r in runs[tier] if key in r]
            cells.append(f'{np.mean(xs):.3f} ({len(xs)})' if xs else '-')
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return lines


def plot_frontiers(curves, methods, out_dir):
    """One figure per tier: each method's frontier, averaged over the seeds that reach each KL, over its
    raw points (every beta, checkpoint and seed). Needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no frontier figures (pip install matplotlib)')
        return
    for tier in [t for t in TIERS if any(key[1] == t for key in curves)]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, method in enumerate(methods):
            seeds = [pts for (m, t, _), pts in curves.items() if (m, t) == (method, tier)]
            if not seeds:
                continue
            ax.scatter(*zip(*[p for pts in seeds for p in pts]), s=4, alpha=0.25, color=f'C{i}')
            grid = np.linspace(0, min(max(k for k, _ in pts) for pts in seeds), 50)
            ax.plot(grid, [np.mean([reward_at_kl(pts, k) for pts in seeds]) for k in grid], color=f'C{i}', label=method)
        ax.set(xlabel='KL to SFT (nats per sequence)', ylabel='mean ground-truth reward', title=f'{tier} tier')
        ax.legend(fontsize=6)
        fig.savefig(Path(out_dir) / f'frontier_{tier}.png', dpi=120, bbox_inches='tight')
        plt.close(fig)
        print(f'wrote {Path(out_dir) / f"frontier_{tier}.png"}')


def compare(root, curves, methods, kls):
    """Ceilings and reward-model accuracies per tier, reward at matched KL per method and tier, wall time
    per stage: printed and written to root/compare.md; the frontier figures. Returns the text."""
    root = Path(root)
    lines = [f'po runs of seeds {sorted({s for _, _, s in curves})}; the SFT reference scores at KL 0'] + ceiling_table(root)
    lines += matched_kl_table(curves, methods, kls)
    walls = {}
    for p in root.glob('seed*/*/done.json'):
        walls.setdefault(p.parent.name.split('_')[0], []).append(read_result(p, {'wall_s': NUMBER}, DONE_FIX)['wall_s'])
    lines += ['', 'wall time per stage run (s, mean, runs): '
              + ', '.join(f'{k} {np.mean(v):.0f} (x{len(v)})' for k, v in sorted(walls.items()))]
    text = '\n'.join(lines)
    print(text)
    atomic_write_bytes(root / 'compare.md', (text + '\n').encode())
    plot_frontiers(curves, methods, root)
    return text
