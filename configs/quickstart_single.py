"""Quick start baseline: one model trained for the quick start's whole 32-epoch budget (cosine decay), same data,
model and optimizer as configs/quickstart.py.
    python train.py configs/quickstart_single.py"""
mode = "single"
data_dir = "data/pydoc-byte"
model_size = "tiny"
seq_len = 128
dropout = 0.1
batch_tokens = 1024
micro_batch_size = 8
muon_lr = 0.02
embed_lr = 0.2
head_lr = 0.004
weight_decay = 1.3
epochs = 32.0
warmup_steps = 10
eval_every_epochs = 8.0
log_every = 120
ckpt_every_epochs = 8.0
