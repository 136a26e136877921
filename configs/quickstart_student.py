"""Quick start, the population distilled into one model: the quick start's q0 run's learned-prior mixture at K = 4
(its members scored and the prior fit by eval.py first) teaches one model of the same size for 32 epochs, the same
budget again (the single model's warmup + cosine; README's number, 2.5002 on val, from these values):
    python eval.py runs/quickstart && python student.py configs/quickstart_student.py && python eval.py runs/quickstart_student"""
mode = "student"
teacher_run = "runs/quickstart"
teacher_k = 4
distill_alpha = 0.9
distill_temperature = 1.0
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
eval_every_epochs = 8.0
log_every = 120
ckpt_every_epochs = 8.0
