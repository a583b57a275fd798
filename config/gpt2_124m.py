# GPT-2 124M on one GPU (nanoGPT's recipe, with a fully decayed schedule): about 0.5M tokens per step.
# Prepare OpenWebText-style data with the gpt2 tokenizer first, e.g. your own text:
#   python data/text/prepare.py --input=DIR --name=owt --tokenizer=gpt2
model = 'gpt2'
dataset = 'text/owt'
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
