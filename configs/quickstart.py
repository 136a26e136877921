"""Quick start: q0 on the embedded pydoc corpus (byte tokenizer), a tiny model, CPU, a few minutes.
2 trajectories x 3 cycles x 1 epoch, chain distillation from the second cycle on, then the prior.
    python prepare_data.py && python train.py configs/quickstart.py && python eval.py runs/quickstart"""
mode = "q0"
data_dir = "data/pydoc-byte"
model_size = "tiny"
seq_len = 128
dropout = 0.1
batch_tokens = 4096
micro_batch_size = 16
muon_lr = 0.02
weight_decay = 0.1
num_trajectories = 2
num_cycles = 3
epochs_per_cycle = 1.0
first_cycle_warmup_steps = 10
distill_after_cycles = 1
eval_every_epochs = 1.0
eval_tokens = 16384
log_every = 20
