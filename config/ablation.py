# The No Train No Gain sweep at CPU size, read by `python -m studies.ntng tune` and `... ablate`
# (this file is run as Python). COMMON applies to every run; METHODS maps a row label to (entry point, its
# own overrides), whose values are the papers' starting points (SPEC section 4) scaled to this model and
# the centre of each method's lr grid. TUNE adds grid axes: Sophia-G tunes lr x rho as its authors do.
#   python -m studies.ntng tune --jobs=2                                   # -> out/tune/tuned.json, tune.png
#   python -m studies.ntng ablate --tuned=out/tune/tuned.json --jobs=2     # 5 paired seeds, compare table
# BUDGETS: chosen so that the tuned baseline ends below the stdlib val split's trigram floor
# (data.ngram.ngram_floors) at the smallest budget; 1:2:4 like the paper's 6/12/24 h.

COMMON = dict(
    model='small', batch_size=32,       # 4 blocks, d=128, T=128: stacking goes 1 -> 2 -> 4
    budget_unit='rst', schedule='cosine', warmup_frac=0.02, min_lr=0.0,
    lr=2e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    eval_interval=50, eval_batches=16, log_interval=25, sample_tokens=0,
    compile_loss=False,                 # a 20 s compile per run would dwarf these budgets; vocab 256 is cheap eager
)
BUDGETS = (120.0, 240.0, 480.0)         # RST seconds (half the smallest left the baseline above the trigram floor)
QUICK_BUDGETS = (3.0, 6.0)
TARGET = 1.19  # time to target's val loss: the baseline's worst seed at 480 RST, the value compare's default
# printed for the CPU table since that column completed (2026-12-02); declared here on 2026-12-06 so that a
# column completing later (a 960-RST one) does not move it

METHODS = {
    'baseline': ('train.py', dict()),
    'stack': ('train.py', dict(arch='stack', stack_fracs=(0.125, 0.3), stack_optim='fresh_new')),
    'drop': ('train.py', dict(arch='drop', theta_bar=0.5, gamma_f=100.0)),
    'sb': ('rho.py', dict(method='sb', sb_beta=1.0)),
    'rho': ('rho.py', dict(method='rho', select_frac=0.5)),  # IL model: once per sweep, at the largest budget
    'rho_il_charged': ('rho.py', dict(method='rho', select_frac=0.5, charge_il=True)),  # its IL's training + precompute in every budget
    # RHO-LOSS that can be read (issue 34): charged for an IL model trained on the holdout at a fraction of each
    # run's own budget (one run, plus its precompute), and the RHO-LOSS paper's own selection ratio, 10%
    'rho_il_f0.1': ('rho.py', dict(method='rho', select_frac=0.5, charge_il=True, il_budget_frac=0.1)),
    'rho_il_f0.25': ('rho.py', dict(method='rho', select_frac=0.5, charge_il=True, il_budget_frac=0.25)),
    'rho_s0.1': ('rho.py', dict(method='rho', select_frac=0.1)),  # its own lr grid, the same effort as every row's
    'lion': ('train.py', dict(optimizer='lion', lr=4e-4, weight_decay=0.5, beta1=0.9, beta2=0.99)),
    'sophiag': ('train.py', dict(optimizer='sophiag', lr=1e-3, rho=0.04, weight_decay=0.2, beta1=0.965, beta2=0.99)),
    # today's claims (rows added 2026-12-06, tuned like the rest): Muon on the hidden matrices at Jordan's
    # default lr; its AdamW part (embeddings, head, gains) at COMMON's lr and weight decay, the baseline's
    # tuned values. Schedule-free AdamW at the schedulefree package's default lr, its warm-up absolute (2% of
    # the smallest budget, as the baseline's there), then constant: its average does the decay's work.
    'muon': ('train.py', dict(optimizer='muon', muon_lr=0.02)),
    'sfadamw': ('train.py', dict(optimizer='sfadamw', lr=2.5e-3, warmup_frac=0.0, warmup_units=2.4)),
}
LR_KEY = {'muon': 'muon_lr'}  # the lr a row's tuning grid moves, when it is not lr
TUNE = {'sophiag': {'rho': (0.04, 0.08, 0.16, 0.32, 0.64)}}  # the authors tune rho for a win rate of 0.1-0.5; at the default 0.04
# a short pilot run's win rate was below that band, so the grid starts at the default and goes up (tune extends
# it either way from an edge); 0.32 and 0.64 added 2026-12-06 (issue 34): at 0.16 the win rate only reached the
# band's lower end, and the axis goes on until the rate is inside it or the loss worsens
TUNED_AS = {'rho_il_charged': 'rho', 'rho_il_f0.1': 'rho', 'rho_il_f0.25': 'rho'}  # the same method and lr; the
# accounting differs (the paper's: IL free), and the fraction rows' IL model is their own, smaller one
