"""How a policy is scored on madpo.py's sentiment task, and the method x tier table of the scores.

One sample per held-out prompt from the SFT reference and from each policy, all drawn with the same
generator seed: the mean ground-truth reward (95% CI over prompts), the Monte-Carlo KL to the reference
(nats per sequence: the mean of log pi(y|x) - log ref(y|x) over the policy's own samples) and the win rate
against the reference's sample for the same prompt (ties count half).
"""
import numpy as np
import torch

import budget as budget_lib
from data.reviews.pairs import TIERS, decode, get_scorer, prompts_from, rewards, sample_many

HEADER = ['| | ' + ' | '.join(TIERS) + ' |', '|---' * (len(TIERS) + 1) + '|']  # a markdown table over the tiers


def summarize(r, kl, r_sft):
    (reward, reward_ci), (kl_mean, kl_ci) = budget_lib.t_interval(r.tolist()), budget_lib.t_interval(kl.tolist())
    return {'reward': reward, 'reward_ci': reward_ci, 'kl': kl_mean, 'kl_ci': kl_ci,
            'win_rate': ((r > r_sft).float() + 0.5 * (r == r_sft).float()).mean().item()}


def evaluate_policies(cfg, ref, policies, logps, device):
    """{'sft': scores, name: scores, ...} for the reference and each (name, model) of policies (loaded as
    iterated). logps(model, seq, prompt_len, lens) -> (N,) summed log-probs of the continuations."""
    scorer = get_scorer(cfg.scorer)
    prompts = prompts_from(cfg, 'val', cfg.n_eval, scorer, seed=cfg.seed + 100).to(device)

    def run(policy):
        conts, lens = sample_many(policy, prompts, cfg, torch.Generator(device).manual_seed(cfg.seed + 3))
        seq = torch.cat([prompts, conts], 1)
        kl = logps(policy, seq, cfg.prompt_len, lens) - logps(ref, seq, cfg.prompt_len, lens)
        examples = [decode(prompts[i].cpu(), conts[i].cpu(), lens[i]) for i in range(3)]
        return rewards(scorer, prompts, conts, lens), kl.cpu(), examples

    r_sft, kl, examples = run(ref)
    results = {'sft': {**summarize(r_sft, kl, r_sft), 'examples': examples}}
    for name, policy in policies:
        r, kl, examples = run(policy)
        results[name] = {**summarize(r, kl, r_sft), 'examples': examples}
        print(f"{name}: reward {results[name]['reward']:.3f}, KL {results[name]['kl']:.2f}, sft {results['sft']['reward']:.3f}")
    return results


def table_cell(runs):
    """Mean over seeds; the 95% CI (budget.t_interval) is over seeds, or over prompts when there is one seed."""
    mean = {k: float(np.mean([x[k] for x in runs])) for k in ('reward', 'kl', 'win_rate')}
    ci = runs[0]['reward_ci'] if len(runs) == 1 else budget_lib.t_interval([x['reward'] for x in runs])[1]
    return f"{mean['reward']:.2f} ± {ci:.2f} (KL {mean['kl']:.1f}, win {mean['win_rate']:.2f})", (mean['kl'], mean['reward'])


def reward_table(evals, methods):
    """Markdown lines of the method x tier table over the seeds' eval results (a method no seed ran gets no
    row), and {(method, tier): (kl, reward)} for the plot. The SFT row repeats across tiers."""
    lines, points = [f'{len(evals)} seed(s); cells: mean reward ± 95% CI (KL to SFT, win rate vs SFT)', '', *HEADER], {}
    for method in methods:
        cells = []
        for tier in TIERS:
            runs = [e[key] for e in evals if (key := method if method == 'sft' else f'{method}_{tier}') in e]
            text, points[(method, tier)] = table_cell(runs) if runs else ('-', None)
            cells.append(text)
        if set(cells) != {'-'}:
            lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    return lines, {k: v for k, v in points.items() if v}


def plot(points, methods, path):
    """Mean reward against KL to SFT, a colour per method and a marker per tier (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no plot (pip install matplotlib)')
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, tier), (kl, r) in points.items():
        ax.scatter(kl, r, marker={'high': 'o', 'medium': 's', 'low': '^'}[tier], color=f'C{methods.index(method)}',
                   label=f'{method} {tier}' if method != 'sft' or tier == 'high' else None)
    ax.set(xlabel='KL to SFT (nats per sequence)', ylabel='mean ground-truth reward', title='reward vs KL')
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    print(f'wrote {path}')
