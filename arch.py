"""Active layers over a run: layer stacking and progressive layer dropping, as No Train No Gain
(Kaddour et al. 2023, arXiv 2307.06440, section 3.1) ran them, for GPT and T5-lite alike.

  stack  Efficient Training of BERT by Progressively Stacking (Gong et al., ICML 2019): train a few
         blocks, and at set budget fractions double the depth by copying the trained blocks on top.
  drop   Progressive Layer Dropping (Zhang & He, NeurIPS 2020, arXiv 2010.13369): skip each block with a
         probability that grows with its depth and over the run; evaluation runs every block.

Both are functions of budget progress p: the loop calls before_step (its budget-progress hook) and
before_micro_batch, and checkpoints state_dict. The model only runs the blocks it is told to
(model.set_active_layers).

    python train.py --arch=stack        # or --arch=drop
"""
import math

import torch


class FullDepth:
    """The baseline: every block, every step."""

    def before_step(self, model, optimizer, p):
        pass

    def before_micro_batch(self, model, p):
        pass

    def eval_layers(self, model):
        return model.n_layer

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class LayerStacking(FullDepth):
    """Gong et al. 2019 (as No Train No Gain ran it): train stack_init_layers blocks, and at each budget
    fraction in stack_fracs double the depth by copying block i-L into block i for i in [L, 2L)."""

    def __init__(self, cfg, n_layer):
        self.n_active = cfg.stack_init_layers or max(1, n_layer // 4)
        self.fracs, self.optim_mode, self.doublings = cfg.stack_fracs, cfg.stack_optim, 0

    def before_step(self, model, optimizer, p):
        if self.doublings == 0 and model.active_layers != list(range(self.n_active)):
            model.set_active_layers(self.n_active)  # the first step, or a resume
        while self.doublings < len(self.fracs) and p >= self.fracs[self.doublings]:
            self.double(model, optimizer)

    def double(self, model, optimizer):
        L = self.n_active
        new = list(range(L, min(2 * L, model.n_layer)))
        for blocks in model.block_stacks():  # GPT: its blocks; T5: the encoder's and the decoder's alike
            for i in new:
                blocks[i].load_state_dict(blocks[i - L].state_dict())
        if self.optim_mode == 'reset':  # BERT code: the whole optimizer state starts again
            optimizer.state.clear()
        elif self.optim_mode == 'fresh_new':  # the new blocks' state, if any, is dropped, not copied
            for blocks in model.block_stacks():
                for i in new:
                    for param in blocks[i].parameters():
                        optimizer.state.pop(param, None)
        self.n_active, self.doublings = L + len(new), self.doublings + 1
        model.set_active_layers(self.n_active)

    def eval_layers(self, model):
        return self.n_active

    def state_dict(self):
        return {'n_active': self.n_active, 'doublings': self.doublings}

    def load_state_dict(self, state):
        self.n_active, self.doublings = state['n_active'], state['doublings']


class LayerDropping(FullDepth):
    """Progressive Layer Dropping (Zhang & He 2020): keep_prob theta(p) = theta_bar + (1 - theta_bar) *
    exp(-gamma_f * p); block i of L is dropped with probability (1 - theta) * (i + 1) / L, resampled every
    micro-batch; kept blocks are not rescaled; evaluation runs every block."""

    def __init__(self, cfg):
        self.theta_bar, self.gamma_f = cfg.theta_bar, cfg.gamma_f
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)

    def keep_prob(self, p):
        return self.theta_bar + (1 - self.theta_bar) * math.exp(-self.gamma_f * p)

    def before_micro_batch(self, model, p):
        L = model.n_layer
        drop_prob = (1 - self.keep_prob(p)) * torch.arange(1, L + 1) / L
        kept = (torch.rand(L, generator=self.generator) >= drop_prob).nonzero().flatten().tolist()
        model.set_active_layers(kept or [0])  # at least one block runs (block 0 if all drew a drop)

    def state_dict(self):
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])


ARCHS = ('full', 'stack', 'drop')


def build_arch(cfg, n_layer):
    """The schedule of active blocks that --arch names (cfg: the run config)."""
    if cfg.arch == 'stack':
        return LayerStacking(cfg, n_layer)
    if cfg.arch == 'drop':
        return LayerDropping(cfg)
    return FullDepth()
