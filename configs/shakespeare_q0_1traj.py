"""CPU recipe, budgets 8-64 epochs (BENCHMARKS.md section 3, measured on 2 seeds): one trajectory of 32 cycles x 2
epochs, no chain distillation, learned prior over the snapshots. Same data, model and optimizer as
shakespeare_q0.py; at a budget B < 64 use the population of its first B/2 cycles (eval.py's budget table).
Measured, seed 1 / 2: val 2.250 / 2.261 at 8 epochs (single model 2.272 / 2.281), 2.083 / 2.094 at 16 (single 2.103 /
2.112), 1.992 / 1.988 at 64 (naive ensemble 2.053 / 2.056). Chosen after seeing val: see BENCHMARKS.md.
    python prepare_data.py --source files --files ../shared/data/shakespeare --out_dir data/shakespeare-100k \
        --train_tokens 100000 --val_tokens 100000 --fitness_tokens 50000
    python train.py configs/shakespeare_q0_1traj.py && python eval.py runs/shakespeare_q0_1traj"""
mode = "q0"
data_dir = "data/shakespeare-100k"
model_size = "mini"
seq_len = 128
dropout = 0.1
batch_tokens = 4096
micro_batch_size = 32
muon_lr = 0.02
embed_lr = 0.2
head_lr = 0.004
weight_decay = 1.3
num_trajectories = 1
num_cycles = 32
epochs_per_cycle = 2.0
first_cycle_warmup_steps = 10
lr_floor = 0.08
wd_floor = 0.7
distill_after_cycles = 32            # = num_cycles: no chain distillation (it hurt in every allocation we measured)
distill_alpha = 0.45
distill_temperature = 1.2
eval_every_epochs = 2.0
