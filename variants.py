"""
variants.py: q0 variants beyond the reference that did not pay at CPU scale, kept runnable (bench/reproduce.py's
distill and steps suites train them) and as the example of a variant: a config class and a plan built on q0.py's.

mode=chain (the strong baseline of the Slowrun history, from the same machinery): at each cycle end the model is
re-initialised (fresh optimizer state, warmup again) instead of perturbed, so every member is a model trained from
scratch against its predecessor. Distillation pays there, but the chain is far worse than one cyclic trajectory
(BENCHMARKS 2.3, 2.3b: 1.9109 against 1.8461 at 32 epochs, seed 1; commits 85aef41, f36d556).

distill_teacher=mixture: the teacher is the population's own ensemble: the learned prior over every earlier snapshot
of the trajectory at distill_teacher_k members (prior.select on their fitness log-probs, each snapshot scored once
when saved), p_t = sum_k w_k softmax(z_k / T), K teacher forwards per step. It makes members better but more alike:
the population gains nothing (BENCHMARKS 2.3, 1i: +0.003 on cross-fitted fitness at 194 steps per cycle; commit
189be40 added it, e3b543a ran 1i).

    python variants.py configs/quickstart.py --mode=chain --num_cycles=4 --distill_after_cycles=1
    python variants.py configs/quickstart.py --distill_teacher=mixture --distill_teacher_k=3 --distill_after_cycles=4
"""
import sys
from dataclasses import dataclass

import numpy as np

import prior
import q0
import train
from scores import eval_windows, score_windows


@dataclass
class VariantConfig(q0.Q0Config):
    mode: str = "q0"                 # q0 | chain (re-init, not noise, at each cycle end: the sequential-chain baseline)
    distill_teacher: str = "previous"  # previous snapshot (reference) | mixture: the prior's K of earlier snapshots
    distill_teacher_k: int = 4       # mixture teacher: members (K teacher forwards per step)
    MODES = ("q0", "chain")


class MixtureTeacher(q0.PreviousSnapshot):
    """distill_teacher=mixture (the module docstring). Frozen copies are reused from one cycle to the next."""

    def __init__(self, cfg, track, data, env):
        super().__init__(cfg, track, data, env)
        self.fitness = data["fitness"]
        self.members = []         # [(name, weight, frozen model, its forward)]
        self.fitness_scores = {}  # each snapshot's fitness log-probs, for the prior

    @property
    def forwards(self):
        return len(self.members)

    def targets(self, x):
        return [fwd(x) for _, _, _, fwd in self.members], [w for _, w, _, _ in self.members]

    def at_snapshot(self, name, weights, model, active):
        # log p(y | prefix) at every scored position of the fitness split, on every rank of the group alike (a few
        # windows: cheaper than gathering)
        self.fitness_scores[name] = score_windows(model, self.fitness, eval_windows(self.fitness, self.cfg.seq_len), self.device,
                                                  self.cfg.eval_batch_size)
        if active:
            here = {name: weights}
            self.set_members(self.choose(), lambda n: here[n] if n in here else q0.member_weights(self.cfg, self.track, n), model)

    def choose(self):
        names = list(self.fitness_scores)
        scores = np.stack([self.fitness_scores[n].double().numpy() for n in names])
        idx, wk = prior.select(scores, self.cfg.distill_teacher_k)
        keep = wk > 1e-3  # a member the prior gives (almost) nothing would cost a forward pass for nothing
        return [(names[i], float(x)) for i, x in zip(idx[keep], wk[keep] / wk[keep].sum())]

    def set_members(self, chosen, load_weights, model):
        """chosen: [(name, weight)]; load_weights(name) -> its weights."""
        models = [(m, fwd) for _, _, m, fwd in self.members]
        models += [q0.frozen_copy(model, self.cfg.compile) for _ in range(len(chosen) - len(models))]
        for (name, _), (m, _) in zip(chosen, models):
            m.load_state_dict({k: v.to(self.device) for k, v in load_weights(name).items()})
        self.members = [(name, w, m, fwd) for (name, w), (m, fwd) in zip(chosen, models)]
        self.name = "mixture(" + ", ".join(f"{n} {w:.3f}" for n, w in chosen) + ")"

    def state_dict(self):
        return {"teacher": self.name, "mixture": [[n, w] for n, w, _, _ in self.members],
                "fitness": dict(self.fitness_scores)}

    def load_state_dict(self, state, model):
        self.fitness_scores = dict(state["fitness"])
        if state["mixture"]:
            self.set_members([(n, w) for n, w in state["mixture"]], lambda n: q0.member_weights(self.cfg, self.track, n), model)


class VariantPlan(q0.Q0Plan):
    """q0's plan with the mixture teacher (distill_teacher=mixture) and/or a re-init at every cycle end (mode=chain)."""

    def __init__(self, cfg, track, model, data, env):
        super().__init__(cfg, track, model, data, env)
        if cfg.distill_teacher == "mixture":
            self.teacher = MixtureTeacher(cfg, track, data, env)

    def warms_up(self, cycle):
        return cycle == 0 or self.cfg.mode == "chain"  # the chain: every cycle starts from a fresh init

    def between_cycles(self, model, cycle, gen):
        if self.cfg.mode != "chain":
            return super().between_cycles(model, cycle, gen)
        model.init_weights(generator=gen)  # a fresh model from scratch: new init, no optimizer memory
        return True


def main(argv):
    train.main(argv, VariantConfig, VariantPlan, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
