"""CPU reproduction, naive-ensemble baseline (4 members of 16 epochs) (bench/reproduce.py's settings): byte-level Shakespeare,
100K train bytes, a 0.88M-parameter GPT (8.8x the tokens), heavy WD and dropout.
    python prepare_data.py --source files --files corpus/ --out_dir data/shakespeare-100k --train_tokens 100000 \
        --val_tokens 100000 --fitness_tokens 50000 --heldout_piece_tokens 2048   # corpus/: see configs/shakespeare_q0.py
    python train.py configs/shakespeare_ensemble.py"""
mode = "ensemble"
data_dir = "data/shakespeare-100k"
model_size = "mini"
seq_len = 128
dropout = 0.1
batch_tokens = 4096
micro_batch_size = 32
muon_lr = 0.04                   # model v2, chosen on fitness (BENCHMARKS 1d), as bench/reproduce.py; model v1 used 0.02
embed_lr = 0.2
head_lr = 0.004
weight_decay = 1.3
epochs = 16.0
warmup_steps = 10
eval_every_epochs = 1.0
ensemble_size = 4
