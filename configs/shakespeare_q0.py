"""CPU reproduction, q0 (bench/reproduce.py's settings): byte-level Shakespeare, 100K train bytes, a
0.88M-parameter GPT, 2 trajectories x 16 cycles x 2 epochs = 64 epochs, 32 snapshots, distillation from
cycle 8 on (16 epochs per trajectory: the measured saturation length of the single model). The pre-registered
headline configuration (BENCHMARKS.md section 1, mean of 2 seeds: val 2.008 at 64 epochs vs 2.054 for the naive
ensemble). Not the best measured recipe: shakespeare_q0_1traj.py (one trajectory, no distillation) is better.
    python prepare_data.py --source files --files ../shared/data/shakespeare --out_dir data/shakespeare-100k \
        --train_tokens 100000 --val_tokens 100000 --fitness_tokens 50000
    python train.py configs/shakespeare_q0.py && python eval.py runs/shakespeare_q0
    torchrun --standalone --nproc_per_node=2 train.py configs/shakespeare_q0.py   # one trajectory per process"""
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
num_trajectories = 2
num_cycles = 16
epochs_per_cycle = 2.0
first_cycle_warmup_steps = 10
lr_floor = 0.08
wd_floor = 0.7
distill_after_cycles = 8
distill_alpha = 0.45
distill_temperature = 1.2
eval_every_epochs = 2.0
