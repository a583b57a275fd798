"""How a policy is scored on madpo.py's sentiment task: the task metric of one po run.

A policy is scored on held-out prompts, one sample each, drawn with the same generator seed for every
policy and for the SFT reference: the mean ground-truth reward (95% CI over prompts), the Monte-Carlo KL
to the reference (nats per sequence: the mean of log pi(y|x) - log ref(y|x) over the policy's own samples)
and the win rate against the reference's sample for the same prompt (ties count half). madpo.py scores
each po run at checkpoints along training, a curve of (KL, reward) points starting at the reference's;
the study (studies/madpo_report.py) reads the curves into frontiers and rewards at matched KL.
"""
import math

import torch

from data.reviews.pairs import batched_logps, decode, get_scorer, prompts_from, rewards, sample_many

Z95 = 1.959964  # the normal 97.5% quantile: a CI over --n_eval prompts (Student's t at 159 df, the default, is 1.975)


def mean_ci(xs):
    """(mean, half-width of the normal 95% CI) of a tensor of per-prompt values."""
    xs = xs.double()
    return xs.mean().item(), (Z95 * xs.std().item() / math.sqrt(len(xs)) if len(xs) > 1 else math.nan)


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
        reward, reward_ci = mean_ci(self.r_ref)
        return {'reward': reward, 'reward_ci': reward_ci, 'kl': 0.0, 'kl_ci': 0.0, 'win_rate': 0.5}

    @torch.no_grad()
    def __call__(self, policy):
        conts, lens, r = self.sample(policy)
        seq, P = torch.cat([self.prompts, conts], 1), self.cfg.prompt_len
        kl = (batched_logps(policy, seq, P, lens) - batched_logps(self.ref, seq, P, lens)).cpu()
        (reward, reward_ci), (kl_mean, kl_ci) = mean_ci(r), mean_ci(kl)
        win = ((r > self.r_ref).float() + 0.5 * (r == self.r_ref).float()).mean().item()
        return {'reward': reward, 'reward_ci': reward_ci, 'kl': kl_mean, 'kl_ci': kl_ci, 'win_rate': win,
                'example': decode(self.prompts[0].cpu(), conts[0].cpu(), lens[0])}
