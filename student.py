"""
student.py: a finished population distilled back into one model (mode=student). The student trains for `epochs`
(the single model's warmup + cosine) against the learned-prior mixture of RUN at teacher_k members
(eval.members_at), with q0's distill_loss:
    loss = (1 - a) CE(z_s, y) + a T^2 KL(p_mix || softmax(z_s / T)),   p_mix = sum_k w_k softmax(z_k / T)
from scratch or from the mixture's first member (student_init=best: greedy's first pick, the best on fitness), and is saved as the member "student", which eval.py
scores like any other. The teachers run online (K forwards per step), or, with teacher_topk = k > 0, the mixture is
computed once and its top k per token read from a file (TeacherFile, topk_distill_loss: one forward per step).

    python eval.py runs/quickstart && python student.py configs/quickstart_student.py   # --help lists every key
    python student.py configs/quickstart_student.py --teacher_k=8 --teacher_topk=32 --out_dir=runs/student_top32
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import eval as ev
import model as gpt
import runtime
import store
import train
from config import UserError
from q0 import distill_loss, mixture_log_probs
from scores import window_batches


@dataclass
class StudentConfig(train.Config):
    mode: str = "student"            # student
    teacher_run: str = ""            # the run folder (scored, with prior.json from eval.py) whose mixture teaches
    teacher_k: int = 4               # the prior's mixture of teacher_run at K members (eval.members_at)
    student_init: str = "scratch"    # scratch | best (start from the mixture's first member; same model_size)
    teacher_topk: int = 0            # 0 = K teacher forwards per step; k = the mixture's top k per token, computed once
                                     # into out_dir/teacher_topk/
    distill_alpha: float = 0.9       # loss = (1-a) CE + a T^2 KL(mixture || student)
    distill_temperature: float = 1.0  # T
    MODES = ("student",)


def topk_distill_loss(student_logits, teacher_ids, teacher_probs, targets, alpha, temperature, parts=False):
    """distill_loss with the teacher stored as its k likeliest tokens per position (ids j, probabilities p_j): the KL
    over the k tokens plus one bucket for all the others, r = 1 - sum_j p_j, which the student gives
    q_r = 1 - sum_j q_j (q = softmax(z_s / T)):
        KL = sum_j p_j (log p_j - log q_j) + r (log r - log q_r)
    the exact KL between the two distributions seen at that grain; with k = V it is distill_loss. (Rescaling the top k
    to sum 1 instead, with no bucket, makes the teacher over-confident and lost: BENCHMARKS.md 3b.1.) parts=True:
    -> (loss, CE, KL), as distill_loss."""
    ce = F.cross_entropy(student_logits.flatten(0, 1), targets.flatten())
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = teacher_probs.float()
    kl = (torch.xlogy(p, p) - p * log_q.gather(-1, teacher_ids)).sum(-1)
    log_q_rest = torch.logsumexp(log_q.scatter(-1, teacher_ids, float("-inf")), dim=-1)
    r = torch.where(torch.isfinite(log_q_rest), (1 - p.sum(-1)).clamp_min(0), 0.0)  # k = V: no bucket
    kl = (kl + torch.xlogy(r, r) - torch.where(r > 0, r * log_q_rest, 0.0)).mean()
    loss = (1 - alpha) * ce + alpha * temperature ** 2 * kl
    return (loss, ce.detach(), kl.detach()) if parts else loss


class TeacherFile:
    """The cheap teacher for a large K (teacher_topk = k > 0, issue 16): the mixture is computed once over a fixed grid
    of windows of the train split (window w = tokens [wT, wT + T], stride T from the first token) and its k likeliest
    tokens per position are stored beside the student, in out_dir/teacher_topk/: part i holds windows i, i+P, i+2P, ...
    (P = the group size that made the file) as ids.i.npy (uint16 while the vocab fits) and probs.i.npy (float16), 4k
    bytes per token (12.8 GB for 100M tokens at k = 32), each with its sha256 beside it. Group rank r computes parts
    r, r + size, ..., so the K forwards are split over the ranks; a part is held in host memory until written, and one
    that is missing or fails its sha256 is computed again at the next start. The student then trains from the file
    with one forward per step. It is also the student's loader: the grid is shuffled each epoch by (seed, track,
    epoch) but not re-chunked as EpochLoader does (a stored target belongs to its window); a micro-batch is
    EpochLoader's (x, y) plus the stored top k of its rows (ids, probabilities)."""

    def __init__(self, cfg, track, data, env, vocab, load_teachers, description):
        """load_teachers() -> [(name, weight, model)]: called only when a part has to be computed."""
        c = cfg
        self.tokens, self.T, self.R, self.key = data["train"], c.seq_len, c.batch_tokens // c.seq_len, (c.seed + track, track)
        self.windows_per_epoch = (len(self.tokens) - 1) // c.seq_len
        self.steps_per_epoch = self.windows_per_epoch // self.R
        self.dir, self.k, self.temperature = Path(c.out_dir) / "teacher_topk", c.teacher_topk, c.distill_temperature
        self.vocab = vocab  # the teachers' too (StudentPlan.check)
        spec = dict(teacher=description, k=self.k, temperature=self.temperature, seq_len=c.seq_len,
                    windows=self.windows_per_epoch, train_sha256=data["train_meta"]["sha256"])
        if env["group_rank"] == 0 and not (self.dir / "meta.json").exists():
            store.write_json(dict(spec, parts=env["group_size"]), self.dir / "meta.json")
        env["barrier"]()
        meta = store.read_json(self.dir / "meta.json", "teacher file record", f"delete {self.dir}: it is computed again")
        if {key: meta.get(key) for key in spec} != spec:
            raise UserError(f"{self.dir} holds the targets of another teacher ({meta.get('teacher')}, k {meta.get('k')}, "
                            f"T {meta.get('temperature')}) than this student's ({description}, k {self.k}, T "
                            f"{self.temperature}): delete it (was prior.json refit?) and re-run; it is computed again")
        self.parts = meta["parts"]
        path, teachers = (lambda kind, i: self.dir / f"{kind}.{i}.npy"), None
        for i in range(env["group_rank"], self.parts, env["group_size"]):
            intact = [store.array_intact(path(kind, i)) for kind in ("ids", "probs")]
            if not all(intact):
                if False in intact:  # there, but not what was written: say so before computing it again
                    print(f"warning: teacher file part {i} in {self.dir} does not match its sha256 (changed on disk); "
                          f"computing it again", file=sys.stderr, flush=True)
                teachers = teachers or load_teachers()
                self.compute_part(i, teachers, env["device"], c.micro_batch_size, path)
        env["barrier"]()
        self.ids = [np.load(path("ids", i), mmap_mode="r") for i in range(self.parts)]
        self.probs = [np.load(path("probs", i), mmap_mode="r") for i in range(self.parts)]
        self.epoch = None

    @torch.no_grad()
    def compute_part(self, i, teachers, device, batch_size, path):
        t0, T, windows = time.time(), self.T, range(i, self.windows_per_epoch, self.parts)
        shape = (len(windows), T, self.k)
        ids, probs = np.empty(shape, np.uint16 if self.vocab <= 2 ** 16 else np.int32), np.empty(shape, np.float16)
        n, kept = 0, 0.0
        for rows in window_batches(self.tokens, [(w * T, w * T + T + 1) for w in windows], batch_size, device):
            with runtime.autocast(device):
                logits = [m(rows[:, :-1]) for _, _, m in teachers]
            top = mixture_log_probs(logits, [w for _, w, _ in teachers], self.temperature).topk(self.k, dim=-1)
            p = top.values.exp()
            probs[n:n + len(rows)], ids[n:n + len(rows)] = p.cpu().numpy(), top.indices.cpu().numpy()
            kept, n = kept + p.sum(-1).sum().item(), n + len(rows)
        store.save_array(ids, path("ids", i))
        store.save_array(probs, path("probs", i))
        print(f"teacher file part {i} of {self.parts}: {n * T:,} tokens, top {self.k} hold {kept / max(1, n * T):.4f} of "
              f"the mixture's probability on average; {time.time() - t0:.1f} s", flush=True)

    def micro_batch(self, step, micro_index, micro_rows, device):
        """-> x, y (B, T) and the stored top k of those rows: ids (B, T, k) int64, probabilities (B, T, k) float32."""
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, np.random.default_rng([*self.key, epoch]).permutation(self.windows_per_epoch)
        row0 = b * self.R + micro_index * micro_rows
        windows = self.order[row0:row0 + micro_rows]
        rows = np.stack([self.tokens[w * self.T: w * self.T + self.T + 1] for w in windows])
        rows = torch.from_numpy(rows.astype(np.int64)).to(device, non_blocking=True)
        at = lambda arrays, w: arrays[w % self.parts][w // self.parts]
        ids = torch.from_numpy(np.stack([at(self.ids, w) for w in windows]).astype(np.int64)).to(device)
        probs = torch.from_numpy(np.stack([at(self.probs, w) for w in windows]).astype(np.float32)).to(device)
        return rows[:, :-1], rows[:, 1:], ids, probs


class StudentPlan(train.SinglePlan):
    """mode=student (the module docstring): SinglePlan's schedule, a mixture teacher, one member "student". The
    teachers are rebuilt from prior.json and the member files on resume."""

    @classmethod
    def check(cls, cfg, data):
        """Before anything is written: the teacher run has a current prior, its mixture at teacher_k can be read, its
        members were trained on the student's tokens, teacher_topk fits the vocab, and student_init=best has a
        teacher of the student's shape."""
        run, meta = Path(cfg.teacher_run), data["meta"]
        if not (run / "prior.json").is_file():
            raise UserError(f"config key 'teacher_run' = {cfg.teacher_run!r}: must be a finished run with prior.json: "
                            f"train it, then python eval.py <run> (scores it, fits the prior)", status=2)
        if cfg.teacher_topk > meta["vocab_size"]:
            raise UserError(f"config key 'teacher_topk' = {cfg.teacher_topk}: more than the vocab ({meta['vocab_size']}); "
                            f"use at most {meta['vocab_size']}", status=2)
        pairs = teacher_mixture(cfg)
        for name, _ in pairs:  # the rows and configs only: each file's sha256 is checked when its weights are loaded
            ckpt = store.read_member(run / "members" / f"{name}.pt", name, check=False)
            if (ckpt["data"]["tokenizer"], ckpt["data"]["vocab_size"]) != (meta["tokenizer"], meta["vocab_size"]):
                raise UserError(f"teacher {name} of {run} was trained on {ckpt['data']['tokenizer']} tokens (vocab "
                                f"{ckpt['data']['vocab_size']}), the student's data_dir holds {meta['tokenizer']} (vocab "
                                f"{meta['vocab_size']}): use the teacher run's data_dir", status=2)
        best = gpt.GPTConfig(**store.read_member(run / "members" / f"{pairs[0][0]}.pt", check=False)["model_config"])
        mine = gpt.config_for(cfg.model_size, vocab_size=meta["vocab_size"], seq_len=cfg.seq_len)
        shape = lambda c: (c.n_layer, c.n_embd, c.mlp_hidden, c.padded_vocab_size)
        if cfg.student_init == "best" and shape(best) != shape(mine):
            raise UserError(f"student_init=best needs the student's model_size to be the teacher's ({best}); use "
                            f"student_init=scratch for another size", status=2)

    def __init__(self, cfg, track, model, data, env):
        c, run = cfg, Path(cfg.teacher_run)
        pairs = teacher_mixture(cfg)
        load_teacher = lambda name: store.load_member(run / "members" / f"{name}.pt", env["device"], expected=name)[0].requires_grad_(False)
        load_all = lambda: [(n, w, load_teacher(n)) for n, w in pairs]
        self.description = "mixture(" + ", ".join(f"{n} {w:.3f}" for n, w in pairs) + f") of {run}"
        self.file = (TeacherFile(cfg, track, data, env, model.cfg.vocab_size, load_all, self.description)
                     if c.teacher_topk else None)
        self.teachers = [(n, w, None) for n, w in pairs] if self.file else load_all()
        super().__init__(cfg, track, model, data, env)
        if self.file:  # the student's data is the file's window grid; the file holds what the K models would give
            self.loader = self.file
            self.total_steps = max(1, round(cfg.epochs * self.loader.steps_per_epoch))
            self.save_steps = [self.total_steps]
        if c.student_init == "best":  # the mixture's first pick; on resume the checkpoint's weights replace these
            best = self.teachers[0][2] if self.teachers[0][2] is not None else load_teacher(pairs[0][0])
            model.load_state_dict(best.state_dict())

    def loss(self, model, batch):
        c = self.cfg
        if self.file:
            x, y, ids, probs = batch
            loss, *self.parts = topk_distill_loss(model(x), ids, probs, y, c.distill_alpha, c.distill_temperature, True)
            return loss
        x, y = batch
        z_s = model(x)
        with torch.no_grad():
            z_t = [m(x) for _, _, m in self.teachers]
        loss, *self.parts = distill_loss(z_s, z_t, y, c.distill_alpha, c.distill_temperature,
                                         [w for _, w, _ in self.teachers], True)
        return loss

    def log_fields(self, step):
        """The teacher forwards per step (none from the top-k file), and the last micro-batch's CE and KL."""
        parts = {key: float(value) for key, value in zip(("ce", "kl"), self.parts) if value is not None}
        return dict(teacher_forwards=0 if self.file else len(self.teachers), **parts)

    def at_save(self, model, step, save):
        save(dict(name="student", mode="student", track=0, cycle=0, seed=self.cfg.seed, epochs=self.cfg.epochs,
                  budget_epochs=self.cfg.epochs, teacher=self.description))
        return False


def teacher_mixture(cfg):
    """[(name, weight)]: the mixture of teacher_run at teacher_k (eval.members_at), from a prior.json that is intact
    and current for those members' files."""
    run = Path(cfg.teacher_run)
    pj = ev.read_prior(run, "teacher prior")
    try:  # K past the population: all of it; a K prior.json lacks is chosen from the run's fitness scores
        pairs = ev.members_at(pj, cfg.teacher_k, run)
    except (FileNotFoundError, ValueError) as e:  # those scores missing or damaged: one line, with its fix
        raise UserError(f"teacher_k={cfg.teacher_k}: {e}") from None
    ev.check_fit_on(run, pj, [n for n, _ in pairs])
    return pairs


def main(argv):
    train.main(argv, StudentConfig, StudentPlan, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
