"""Quick start: q0 on the embedded pydoc text (16K train bytes: data-scarce, so many epochs pay), a 0.14M-parameter
GPT, CPU, a few minutes. One trajectory of 16 cycles x 2 epochs = a 32-epoch budget, 16 snapshots, the learned prior;
no chain distillation and no noise (the CPU benchmark's recipe, BENCHMARKS.md section 1). The two baselines of the
same 32-epoch budget are quickstart_single.py and quickstart_ensemble.py; eval.py puts all three in one table:
    python prepare_data.py && python q0.py configs/quickstart.py && python train.py configs/quickstart_single.py \\
      && python train.py configs/quickstart_ensemble.py \\
      && python eval.py runs/quickstart runs/quickstart_single runs/quickstart_ensemble"""
mode = "q0"
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
num_trajectories = 1
num_cycles = 16
epochs_per_cycle = 2.0
first_cycle_warmup_steps = 10
perturb_scale_start = 0.0
perturb_scale_end = 0.0
distill_after_cycles = 16            # = num_cycles: no chain distillation
eval_every_epochs = 8.0
log_every = 10                       # 3 rows a cycle (30 steps): the sawtooth shows in the log
ckpt_every_epochs = 8.0
