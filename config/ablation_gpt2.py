# The No Train No Gain protocol at GPT-2 scale on one GPU: GPT-2 124M on FineWeb-Edu (gpt2 tokens), budgets
# in RST seconds of YOUR GPU (calibrate first), every row tuned with the same effort. Read by
# `python -m studies.ntng tune|ablate` like config/ablation.py; README.md "The GPU path" walks through it.
#   python -m studies.ntng ablate config/ablation_gpt2.py --quick=True    # smoke test on any machine (QUICK_COMMON)
#   python calibrate.py config/gpt2_124m.py --batch_size=16 --device=cuda --rst_repeats=3
#   python -m studies.ntng tune config/ablation_gpt2.py --out_dir=out/gpt2/tune --methods="('baseline','muon')"
#   python -m studies.ntng ablate config/ablation_gpt2.py --tuned=out/gpt2/tune/tuned.json --out_dir=out/gpt2/ablation
# Cost: an RST budget is about that many seconds of the GPU its table was calibrated on (plus evals and a
# compile of ~1 min per run), so the protocol's time is the sum of its budgets: README.md's table.

COMMON = dict(
    model='gpt2', dataset='fineweb_edu', tokenizer='gpt2',  # 124M; vocabulary padded to 50304 (vocab_multiple)
    batch_size=16, grad_accum=8,        # 131,072 tokens a step: thousands of steps in the smallest budget
    budget_unit='rst', schedule='cosine', warmup_frac=0.02, min_lr=0.0,
    lr=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,  # nanoGPT's GPT-2 values
    eval_interval=250, eval_batches=40, log_interval=25, sample_tokens=0,
    compile=True,                       # per block under layer dropping (train.compiled)
)
BUDGETS = (1800.0, 3600.0, 7200.0)     # RST seconds: 0.5, 1, 2 GPU-hours, 1:2:4 like the paper's 6/12/24 h
QUICK_BUDGETS = (4.0, 8.0)             # --quick: steps (QUICK_COMMON's unit, its keys over every row's)
QUICK_COMMON = dict(model='tiny', dataset='stdlib', tokenizer='byte', batch_size=8, grad_accum=1, budget_unit='iters',
                    warmup_units=1.0, compile=False, eval_interval=2, eval_batches=2, log_interval=1, device='cpu')

METHODS = {
    'baseline': ('train.py', dict()),
    'stack': ('train.py', dict(arch='stack', stack_fracs=(0.125, 0.3), stack_optim='fresh_new')),  # 3 -> 6 -> 12 blocks
    'drop': ('train.py', dict(arch='drop', theta_bar=0.5, gamma_f=100.0)),
    'sb': ('rho.py', dict(method='sb', sb_beta=1.0)),
    'rho': ('rho.py', dict(method='rho', select_frac=0.1)),  # the RHO-LOSS paper's usual 10%; IL model once per sweep
    'lion': ('train.py', dict(optimizer='lion', lr=1e-4, weight_decay=1.0, beta1=0.9, beta2=0.99)),  # Lion: lr / 3-10, wd x 3-10
    'sophiag': ('train.py', dict(optimizer='sophiag', lr=6e-4, rho=0.05, weight_decay=0.2, beta1=0.965, beta2=0.99)),  # its GPT-2 small values
    'muon': ('train.py', dict(optimizer='muon', muon_lr=0.02)),  # AdamW part at COMMON's lr
    'sfadamw': ('train.py', dict(optimizer='sfadamw', lr=2.5e-3, warmup_frac=0.0, warmup_units=36.0)),  # 2% of 1800 RST
}
TUNE = {'sophiag': {'rho': (0.03, 0.05, 0.1)}}
LR_KEY = {'muon': 'muon_lr'}

# The reduced protocol, about a day of one H100-class GPU (README.md): six rows, budgets of 600 and 1200 RST,
# 3 seeds, tuned at 600:
#   --methods="('baseline','stack','drop','lion','muon','sfadamw')" --budgets="(600.0,1200.0)" --seeds="(0,1,2)"
#   (and tune --budget=600.0 with the same --methods)
