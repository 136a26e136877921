"""q0 on the Slowrun setting: the 1.8B GPT on 100M FineWeb tokens (GPT-2 tokenizer).
All values are the reference run's defaults (qlabs-eng/slowrun unlimited/train.py, arXiv 2606.03938), not tuned here.
    python prepare_data.py --source fineweb --tokenizer gpt2 --out_dir data/fineweb-gpt2
    torchrun --nnodes=5 --nproc_per_node=8 ... q0.py configs/fineweb_1p8b_q0.py   # one trajectory per node
    torchrun --standalone --nproc_per_node=8 q0.py configs/fineweb_1p8b_q0.py --num_trajectories=1   # one node"""
mode = "q0"
data_dir = "data/fineweb-gpt2"
model_size = "1.8B"
seq_len = 2048
dropout = 0.1
compile = True
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
ckpt_every_epochs = 0.25
