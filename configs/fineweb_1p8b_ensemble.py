"""The naive-ensemble baseline: 16 independently seeded 1.8B GPTs of 16 epochs each (256 epochs).
    torchrun --standalone --nproc_per_node=8 train.py configs/fineweb_1p8b_ensemble.py"""
mode = "ensemble"
data_dir = "data/fineweb-gpt2"
model_size = "1.8B"
seq_len = 2048
dropout = 0.1
compile = True
ddp_bucket_cap_mb = 200        # ~one block's fp32 gradients (196 MiB) a bucket: ~35 compiled subgraphs, not ~270 at
                               # torch's 25; each block's all-reduce still overlaps the next one's backward (not timed)
batch_tokens = 524288
micro_batch_size = 2
muon_lr = 0.01                 # the reference: matrix 0.04 x lr_multiplier 0.25
embed_lr = 0.0375               # the reference: 0.15 x 0.25
head_lr = 0.0005                # the reference: 0.002 x 0.25
weight_decay = 1.3             # on the matrices, the embedding and the head (embed_head_wd), as the reference
epochs = 16.0
warmup_steps = 50
decay = "cosine"
eval_every_epochs = 1.0
eval_tokens = 1048576
eval_batch_size = 2            # fp32 logits 2 x 2048 x 50257 x 4 B = 0.8 GB per eval forward
ckpt_every_epochs = 0.5        # ~12 min of work at most lost to a crash (see fineweb_1p8b_q0.py)
ensemble_size = 16
