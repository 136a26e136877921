"""q0 on the Slowrun setting: the 1.8B GPT on 100M FineWeb tokens (GPT-2 tokenizer).
    python prepare_data.py --source fineweb --tokenizer gpt2 --out_dir data/fineweb-gpt2
    torchrun --nnodes=5 --nproc_per_node=8 ... q0.py configs/fineweb_1p8b_q0.py   # one trajectory per node
    torchrun --standalone --nproc_per_node=8 q0.py configs/fineweb_1p8b_q0.py --num_trajectories=1   # one node

The reference's values (qlabs-eng/slowrun unlimited/train.py, arXiv 2606.03938), not tuned here: the LRs (its base x
lr_multiplier 0.25), weight decay 1.3 on the matrices, embedding and head with cautious decay on the matrices (model
v2), AdamW betas (0.8, 0.95) and eps 1e-10, grad clip 1.0, dropout 0.1 on the residual branches, seq_len 2048, the
cycle (2 epochs, linear sawtooth, lr_floor 0.08, wd_floor 0.7), the noise (0.25 -> 0.05), chain distillation (after 8
cycles, a 0.45, T 1.2), 5 trajectories x 96 cycles, the init, separate q/k/v and gate/up matrices, the embedding norm
and logits over the real 50,257 ids. Not the reference's:
- batch: constant 524,288 tokens; the reference's is 393,216 in the first and last quarter of the cycles and 524,288
  in the middle half (not implemented: one batch size keeps the checkpoint, data position and resume simple);
- the teacher is an fp32 copy (the reference: bf16): 3.5 GB more per rank, inside the memory estimate printed at start;
- Muon is torch.optim.Muon (Newton-Schulz, 5 steps); the reference's adds a per-row normalisation of the update
  (MuonEq-R: -0.003 on the limited track, record 18), Polar Express coefficients and a per-row second moment;
- eval_tokens, eval_batch_size and the checkpoint cadence are this project's (below).
The reference also has Slowrun-specific extras that are not q0 primitives and are not in this minimalist GPT; the
leaderboard (qlabs-eng/slowrun README, each record's val loss against the one before it, so a record's gain may mix
other changes) credits them: value embeddings as projections from x0 -0.027 (limited track, record 3); U-Net skips
-0.021 (limited 5; with attention gates -0.033 on the unlimited track, record 4); per-head attention gates -0.019
(limited 6); layer looping (layers 15-20 replayed) -0.010 and -0.007 (limited 7, 8; the reference replays 15-24 four
more times, 70 layer applications per forward); multi-token prediction -0.005 (limited 16); head mixing (Interleaved
Head Attention) -0.008 (limited 17); sliding windows: no record of their own. Well over 0.1 nats together: numbers from
this config are not comparable with the reference's 2.987."""
mode = "q0"
data_dir = "data/fineweb-gpt2"
model_size = "1.8B"
seq_len = 2048
dropout = 0.1
compile = True
ddp_bucket_cap_mb = 200        # ~one block's fp32 gradients (196 MiB) a bucket: ~35 compiled subgraphs, not ~270 at
                               # torch's 25; each block's all-reduce still overlaps the next one's backward (not timed)
batch_tokens = 524288          # 2 seqs x 2048 x 8 GPUs x 16 accum
micro_batch_size = 2           # fits an 80 GB H100 at 1.8B in bf16
muon_lr = 0.01                 # the reference: matrix 0.04 x lr_multiplier 0.25
embed_lr = 0.0375               # the reference: 0.15 x 0.25
head_lr = 0.0005                # the reference: 0.002 x 0.25
weight_decay = 1.3             # on the matrices, the embedding and the head (embed_head_wd), as the reference
num_trajectories = 5           # one per 8-GPU node
num_cycles = 96                # 5 x 96 = 480 snapshots, 960 epochs in all
epochs_per_cycle = 2.0
cycle_shape = "linear"
lr_floor = 0.08
wd_floor = 0.7
perturb_scale_start = 0.25
perturb_scale_end = 0.05
distill_after_cycles = 8       # 16 epochs: about where a single model saturates
distill_alpha = 0.45
distill_temperature = 1.2
log_every = 10
eval_every_epochs = 2.0
eval_tokens = 1048576          # 1M of the 10M val tokens during training; eval.py scores all of them
eval_batch_size = 2            # 2 windows per eval forward: fp32 logits 2 x 2048 x 50257 x 4 B = 0.8 GB (16: 6.6 GB)
# an epoch is ~25 min per node (960 epochs in ~80 h on 5 nodes); a checkpoint is ~15 GB, written in the background
# (the training stall is the device-to-host copy, a few seconds; estimated, not measured on a GPU). Every 0.5 epochs:
# at most ~12 min of work lost to a crash, ~1.5 TB written per node over the run, 0.1 GB/s on average for 5 nodes
ckpt_every_epochs = 0.5
