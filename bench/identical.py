"""
bench/identical.py: the fingerprint of a fixed set of small runs, to show a restructuring changes no number.

    python bench/identical.py OUT_DIR > before.json   # on the old commit
    python bench/identical.py OUT_DIR2 > after.json   # on the new one; then: diff before.json after.json
    python bench/identical.py OUT_DIR --no-run        # only the fingerprint of runs already in OUT_DIR

Runs, on the quick start's data (python prepare_data.py first): the quick start itself (q0, single, naive ensemble,
then eval.py on all three), a 16-cycle q0 run with chain distillation and perturbation noise on, one with the mixture
teacher and a 4-cycle sequential chain (variants.py), and two students of the quick start's population (student.py:
online teachers, and the top-k teacher file). Prints one JSON object: every member's sha256 (of its weights and its manifest row, train loss
included, with OUT_DIR written as OUT so that two folders compare), every eval.json's numbers, and the numbers of the
comparison table eval.py printed (timings left out).
"""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from store import digest  # noqa: E402


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def numbers(obj):
    """A report less what is not a number it computed: timings ("seconds"), and the tools' sections that eval.py wrote
    before they moved to tools/ (an empty "downstream" list)."""
    if isinstance(obj, dict):
        return {k: numbers(v) for k, v in obj.items() if k != "seconds" and not (k == "downstream" and v == [])}
    return [numbers(v) for v in obj] if isinstance(obj, list) else obj


def main(out_dir, fresh=True):
    out = Path(out_dir).resolve()
    qs = ["configs/quickstart.py"]
    runs = {  # name: (script, arguments)
        "quickstart": ("q0.py", qs),
        "quickstart_single": ("train.py", ["configs/quickstart_single.py"]),
        "quickstart_ensemble": ("train.py", ["configs/quickstart_ensemble.py"]),
        "distill": ("q0.py", [*qs, "--distill_after_cycles=4", "--perturb_scale_start=0.25", "--perturb_scale_end=0.05"]),
        "mixture": ("variants.py", [*qs, "--distill_after_cycles=4", "--distill_teacher=mixture", "--distill_teacher_k=3"]),
        "chain": ("variants.py", [*qs, "--mode=chain", "--num_cycles=4", "--distill_after_cycles=1"]),
    }
    for name, (script, argv) in runs.items() if fresh else ():
        run(script, *argv, f"--out_dir={out / name}")
    if fresh:
        (out / "table.txt").write_text(run("eval.py", *(str(out / n) for n in ("quickstart", "quickstart_single",
                                                                            "quickstart_ensemble"))))
        teacher = ["configs/quickstart_student.py", f"--teacher_run={out / 'quickstart'}", "--epochs=4"]
        run("student.py", *teacher, f"--out_dir={out / 'student'}")
        run("student.py", *teacher, "--teacher_topk=16", f"--out_dir={out / 'student_topk'}")
        for name in ("distill", "mixture", "chain", "student", "student_topk"):
            run("eval.py", str(out / name))
    members = {}
    for p in sorted(out.glob("*/members/*.pt")):
        ckpt = torch.load(p, weights_only=True)
        row = json.loads(json.dumps(ckpt["row"]).replace(str(out), "OUT"))
        members[f"{p.parents[1].name}/{p.stem}"] = digest(dict(model=ckpt["model"], row=row))
    evals = {p.parent.name: numbers(json.loads(p.read_text().replace(str(out), "OUT"))) for p in sorted(out.glob("*/eval.json"))}
    lines = (out / "table.txt").read_text().splitlines()
    table = [line.split("|", 1)[1] for line in lines[lines.index(next(x for x in lines if x.startswith("run "))):] if "|" in line]
    print(json.dumps(dict(members=members, evals=evals, table=table), indent=1, sort_keys=True, default=str))


if __name__ == "__main__":
    main(sys.argv[1], fresh="--no-run" not in sys.argv)
