# GPT-2 124M on one GPU (nanoGPT's recipe, with a fully decayed schedule): about 0.5M tokens per step.
# Data: FineWeb-Edu's sample-10BT subset (about 10B gpt2 tokens, as its name says), streamed from the Hub:
#   pip install datasets
#   python data/fineweb_edu/prepare.py                        # -> data/fineweb_edu/gpt2/ (resumable)
#   python data/fineweb_edu/prepare.py --max_tokens=3000000000 # enough for the 2.5B-token budget below
# Cost: disk 2 bytes per token (uint16): 2 GB per billion tokens (streaming reads the Hub's shards without
# storing them). Time, measured here (AMD EPYC, 2 shared cores under load): the prepare path ran a 2000-merge
# BPE built in code at 1.96M tokens/s per worker process. An *extrapolation* from that rate, not a gpt2
# measurement (gpt2 has 50k merges): ~8.5 worker-minutes per billion tokens, so ~0.5 min per billion with
# --num_proc=16 if workers scale linearly (not measured), plus the download.
# Offline, or with the data downloaded elsewhere: --input=FOLDER of its .parquet files.
out_dir = 'out/gpt2_124m'
model = 'gpt2'
dataset = 'fineweb_edu'
tokenizer = 'gpt2'
batch_size = 16
grad_accum = 32            # 16 x 1024 x 32 = 524,288 tokens per optimizer step (x GPUs under torchrun)
budget_unit = 'tokens'
budget = 2.5e9             # tokens; ~4,800 steps
lr = 6e-4
min_lr = 0.0
warmup_frac = 0.02
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
eval_interval = 250
eval_batches = 20
log_interval = 10
compile = True
