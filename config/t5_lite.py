# T5-lite on the embedded stdlib corpus, CPU-sized: span corruption (noise 0.15, mean span 3) on the
# same loop, budget and methods as GPT.
#
#     python train.py config/t5_lite.py
#     python train.py config/t5_lite.py --arch=drop --gamma_f=20       # No Train No Gain's T5 layer dropping
#
# Each example is a raw chunk of 141 bytes -> 128 encoder tokens (62 sentinels, start and EOS take the
# vocabulary from 256 to 320) and 29 target tokens. 'tokens' count encoder input tokens.
out_dir = 'out/t5_lite'     # another --out_dir for each variant (--arch=drop ...), or --overwrite=True
model_type = 't5'
model = 't5-small-cpu'   # 4 encoder + 4 decoder blocks, 128 wide, 4 heads, gated-GELU 384, 128 input tokens
bias = False             # T5 has no biases
batch_size = 32
lr = 2e-3
weight_decay = 0.0       # No Train No Gain's T5: no weight decay
beta2 = 0.99
budget_unit = 'tokens'   # no committed RST table for T5 yet: `python calibrate.py config/t5_lite.py` makes one
budget = 2_000_000.0     # encoder input tokens: ~490 steps of 32 x 128, ~10 min on a 2-core CPU
eval_interval = 100
log_interval = 10
