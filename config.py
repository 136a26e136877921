"""
config.py: one config system for every entry point (train.py, q0.py, student.py, variants.py, eval.py,
prepare_data.py, tools/): a dataclass of defaults per script, read here, and the rules every value must meet.

    python q0.py configs/quickstart.py --num_cycles=8 --seed 2   # a config file, then --key=value (or --key value)
    python eval.py runs/a runs/b --eval_tokens=2048 --score      # a script whose arguments are not a config file

A config file is `key = value` lines, read with `ast` and never executed. Flags override it: `--key=value` or
`--key value`; a bool key alone is true (`--score`); a list key takes every argument up to the next flag. Each
script's dataclass is its one source of defaults: `--help` prints them with the comment beside each. An unknown key,
a wrong type, a value out of range or a combination that cannot run is refused by name (UserError, exit 2) before
anything is written: the per-key rules are the tables below, the rules that need the data or the world size are
check_run's. The resume rules (which keys may change on --resume=True, which may grow) are here too.
"""
import ast
import inspect
import json
import math
import re
from dataclasses import fields
from pathlib import Path


class UserError(RuntimeError):
    """Something the user must fix: a bad config, missing or corrupt data, a run folder in the wrong state. Every
    entry point prints the message (what is wrong, where, and the fix) as one line, without a traceback, and exits
    with `status`: 2 for a bad config or command line, 1 otherwise. rerun=True: the fix is to run the same command
    again once the cause is gone (a full disk, say); runtime.session prints that command."""

    def __init__(self, message, status=1, rerun=False):
        super().__init__(message)
        self.status, self.rerun = status, rerun


def one_line(e):
    """An exception as one line, for a UserError that names what failed underneath it."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


# -----------------------------------------------------------------------------------------------------
# the rules every value meets, by key name (a key means the same thing in every script that has it)
def _sizes():
    import model  # torch; only a training config has model_size
    return tuple(model.SIZES)


ONE_OF = dict(device=("auto", "cuda", "mps", "cpu"), decay=("cosine", "linear", "none"),
              cycle_shape=("linear", "cosine"), student_init=("scratch", "best"), distill_teacher=("previous", "mixture"),
              method=("auto", "em", "adamw"), dtype=("float32", "float16"), backend=("auto", "numpy", "cuda", "cpu"),
              source=("pydoc", "files", "fineweb"), tokenizer=("byte", "gpt2"), tracker=("none", "tensorboard", "wandb"),
              model_size=_sizes)
AT_LEAST = dict(dist_timeout_minutes=1, ddp_bucket_cap_mb=1, seq_len=2, batch_tokens=1, micro_batch_size=1,
                ensemble_size=1, eval_batch_size=1, log_every=1, num_trajectories=1, num_cycles=1, teacher_k=1,
                distill_teacher_k=1, batch_size=1, k=1, muon_lr=0, embed_lr=0, head_lr=0, weight_decay=0, grad_clip=0,
                warmup_steps=0, eval_every_epochs=0, eval_tokens=0, ckpt_every_epochs=0, distill_after_cycles=0,
                perturb_scale_start=0, perturb_scale_end=0, first_cycle_warmup_steps=0, teacher_topk=0, max_new_tokens=0,
                logit_avg=0, budget=0, train_tokens=0, val_tokens=0, fitness_tokens=0, heldout_piece_tokens=-1, split_seed=0)
ABOVE = dict(epochs=0, distill_temperature=0, temperature=0, val_fraction=0, fitness_fraction=0)  # strictly
IN = dict(seed=(0, 10**8, "[0, 10^8): the data order and the dropout masks are seeded from it"),  # lo <= v < hi
          dropout=(0, 1, "[0, 1)"), lr_floor=(0, 1, "[0, 1)"))
CLOSED = dict(wd_floor=(0, 1), distill_alpha=(0, 1), min_lr_frac=(0, 1))  # lo <= v <= hi


def check_keys(cfg):
    """Every key of cfg against the tables above -> cfg, or UserError naming the first bad one."""
    def need(ok, key, allowed):
        if not ok:
            raise UserError(f"config key '{key}' = {getattr(cfg, key)!r}: must be {allowed}", status=2)
    for key, v in ((f.name, getattr(cfg, f.name)) for f in fields(cfg)):
        if key in ONE_OF:
            allowed = ONE_OF[key]() if callable(ONE_OF[key]) else ONE_OF[key]
            need(v in allowed, key, ", ".join(allowed[:-1]) + f" or {allowed[-1]}")
        if key in AT_LEAST:
            need(v >= AT_LEAST[key], key, f">= {AT_LEAST[key]}")
        if key in ABOVE:
            need(v > ABOVE[key], key, f"> {ABOVE[key]}")
        if key in IN:
            need(IN[key][0] <= v < IN[key][1], key, f"in {IN[key][2]}")
        if key in CLOSED:
            need(CLOSED[key][0] <= v <= CLOSED[key][1], key, f"in [{CLOSED[key][0]}, {CLOSED[key][1]}]")
    if hasattr(cfg, "adam_betas"):
        need(len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas), "adam_betas", "two numbers in [0, 1)")
    return cfg


def check_run(cfg, world_size, steps_per_epoch):
    """The rules that need the world size and the data: the process groups, the batch, the cycle."""
    def need(ok, key, allowed):
        if not ok:
            raise UserError(f"config key '{key}' = {getattr(cfg, key)!r}: {allowed}", status=2)
    tracks = cfg.num_tracks()
    n_groups = min(world_size, tracks)
    key = "ensemble_size" if cfg.mode == "ensemble" else "num_trajectories"
    need(max(world_size, tracks) % n_groups == 0, key,
         f"the world size ({world_size}) and the number of tracks ({tracks}) must divide one another")
    group_size = world_size // n_groups
    need(cfg.batch_tokens % (cfg.seq_len * cfg.micro_batch_size * group_size) == 0, "batch_tokens",
         f"must be a multiple of seq_len x micro_batch_size x ranks per track = "
         f"{cfg.seq_len} x {cfg.micro_batch_size} x {group_size}")
    need(steps_per_epoch >= 1, "batch_tokens", f"the train split of {cfg.data_dir} is too small for one global batch "
         f"(plus seq_len for the epoch's random window offset): lower batch_tokens or prepare more data")
    if hasattr(cfg, "epochs_per_cycle"):
        need(round(cfg.epochs_per_cycle * steps_per_epoch) >= 1, "epochs_per_cycle",
             f"a cycle must be at least one step (one epoch is {steps_per_epoch} steps)")


# -----------------------------------------------------------------------------------------------------
# reading: a config file of `key = literal` lines, then the flags
def parse_value(field, value, where):
    """A flag's text (or a config file's literal) as the field's type, or UserError naming both."""
    kind = getattr(field.type, "__name__", field.type)
    if where.startswith("from --") and kind != "str":
        if kind == "bool" and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            value = value.lower() in ("true", "1")
        elif isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                if kind == "float" and value.lower().lstrip("+-") in ("inf", "nan", "infinity"):
                    value = float(value)  # caught below, by name
    expected = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}[kind]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is tuple and not isinstance(value, (tuple, list)):
        value = (value,)
    if expected is tuple:
        value = tuple(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise UserError(f"config key '{field.name}' expects {expected.__name__}, got {value!r} ({where})", status=2)
    if expected is float and not math.isfinite(value):
        raise UserError(f"config key '{field.name}' must be a finite number, got {value!r} ({where})", status=2)
    return value


def config_help(cls, doc):
    """The script's docstring, then every key with its default and the comment beside it in the class source (base
    classes first, a subclass's own keys under its name): the defaults and their meanings have one source."""
    lines, where = [], {}  # where: key -> its line's index, so a subclass's new default replaces the base's line
    for klass in [k for k in reversed(cls.__mro__) if "__dataclass_fields__" in vars(k)]:
        header = f" {klass.__name__}:" if lines else None
        for line in inspect.getsource(klass).splitlines():
            if m := re.match(r"\s{4}(\w+): \w+ = (.+?)\s*(?:#\s*(.*))?$", line):
                text = f"  --{m[1]:<26} default {m[2]:<18} {m[3] or ''}".rstrip()
                if m[1] in where:
                    lines[where[m[1]]] = text
                    continue
                if header:
                    lines.append(header)
                    header = None
                where[m[1]] = len(lines)
                lines.append(text)
            elif (m := re.match(r"\s{5,}# (.*)", line)) and where:  # a key's comment continued on the next line
                lines[-1] += f" {m[1]}"
            elif m := re.match(r"\s{4}# (.*)", line):
                lines.append(f" {m[1]}:")
    return "\n".join([(doc or "").strip(), "", "keys (a config file of `key = value` lines, then --key=value flags "
                      "override):", *lines])


# which script runs each mode: a config of another script's mode is sent there by name
MODE_SCRIPTS = {"single": "train.py", "ensemble": "train.py", "q0": "q0.py", "chain": "variants.py",
                "student": "student.py"}
KEY_SCRIPTS = dict(distill_teacher="variants.py", distill_teacher_k="variants.py", teacher_run="student.py",
                   teacher_k="student.py", student_init="student.py", teacher_topk="student.py")  # keys beyond q0.py's


def load(cls, argv, doc):
    """cls() updated from the arguments -> checked config. cls.ARGS names the key the plain arguments go to ("" for
    a config file: at most one); cls.MODES, when it has a mode, the modes this script runs."""
    if (not argv and cls.ARGS == "") or argv[:1] in (["-h"], ["--help"]):  # a trainer with no config file: its help
        print(config_help(cls, doc))
        raise SystemExit(0 if argv else 2)
    known = {f.name: f for f in fields(cls)}
    cfg, path, pairs, plain, i = cls(), None, [], [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ("-h", "--help"):
            return load(cls, [arg], doc)
        if not arg.startswith("--"):
            plain.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        kind = getattr(getattr(known.get(key), "type", None), "__name__", None)
        if not eq and kind == "tuple":  # a list key takes the arguments up to the next flag
            j = next((j for j in range(i, len(argv)) if argv[j].startswith("--")), len(argv))
            value, i = argv[i:j], j
        elif not eq and kind not in (None, "bool"):
            if i == len(argv) or argv[i].startswith("--"):
                raise UserError(f"{arg} needs a value: {arg}=VALUE or {arg} VALUE", status=2)
            value, i = argv[i], i + 1
        elif not eq:
            value = "true"
        pairs.append((key, value, f"from {arg}"))
    if cls.ARGS:
        if plain:
            pairs.insert(0, (cls.ARGS, plain if known[cls.ARGS].type in ("tuple", tuple) else plain[0], "the arguments"))
        if len(plain) > 1 and known[cls.ARGS].type not in ("tuple", tuple):
            raise UserError(f"unexpected argument {plain[1]!r}: give one {cls.ARGS}, then --key=value flags", status=2)
    elif plain:
        if len(plain) > 1:
            raise UserError(f"unexpected argument {plain[1]!r}: give one config file, then --key=value flags", status=2)
        path = Path(plain[0])
        pairs = read_file(path) + pairs  # file first, flags win
    mode = next((v for k, v, _ in reversed(pairs) if k == "mode"), getattr(cfg, "mode", None))
    if "mode" in known and mode not in cls.MODES and mode in MODE_SCRIPTS:  # before the other's keys fail
        script = MODE_SCRIPTS[mode]
        raise UserError(f"mode {mode!r} is run by {script}: python {script} {' '.join(argv)}", status=2)
    for key, value, where in pairs:
        if key not in known and key in KEY_SCRIPTS:
            raise UserError(f"config key '{key}' ({where}) is {KEY_SCRIPTS[key]}'s: python {KEY_SCRIPTS[key]} "
                            f"{' '.join(argv)}", status=2)
        if key not in known:
            raise UserError(f"unknown config key '{key}' ({where}); known keys: {', '.join(known)} (--help says what "
                            f"each does)", status=2)
        setattr(cfg, key, parse_value(known[key], value, where))
    if "mode" in known and cfg.mode not in cls.MODES:
        raise UserError(f"config key 'mode' = {cfg.mode!r}: must be {' or '.join(cls.MODES)}", status=2)
    if "out_dir" in known and not cfg.out_dir and cls.ARGS == "":
        cfg.out_dir = str(Path("runs") / (path.stem if path else "default"))
    check_keys(cfg)
    if hasattr(cfg, "resolve"):
        cfg.resolve()  # keys that set others: q0.py's budget
    return cfg


def read_file(path):
    """A config file as [(key, value, where)], every line checked: `key = literal`, each key once, UTF-8."""
    if not path.is_file():
        raise UserError(f"config file {path} not found (the recipes are in configs/)", status=2)
    try:
        body = ast.parse(path.read_bytes().decode("utf-8"), str(path)).body
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: byte {e.start} is not UTF-8 ({e.reason}): save the config file as UTF-8", status=2) from None
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: not a config file of `key = value` lines ({e.msg})", status=2) from None
    pairs, seen = [], {}  # seen: key -> the line that set it (a second line would silently override the first)
    for node in body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path}:{node.lineno}: only `key = value` lines are allowed in a config file", status=2)
        key = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"{path}:{node.lineno}: the value of '{key}' must be a literal", status=2) from None
        if key in seen:
            raise UserError(f"{path}: '{key}' is set twice, on lines {seen[key]} and {node.lineno}: keep one "
                            f"(a --{key}=value flag overrides the file)", status=2)
        seen[key] = node.lineno
        pairs.append((key, value, f"{path}:{node.lineno}"))
    return pairs


# -----------------------------------------------------------------------------------------------------
# resume: which keys a continued run may change, and which may grow (a longer run whose first part is the finished one)
RESUME_SAFE_KEYS = {"resume", "out_dir", "device", "compile", "dist_timeout_minutes", "ddp_bucket_cap_mb",
                    "micro_batch_size", "log_every", "eval_every_epochs", "eval_tokens", "ckpt_every_epochs",
                    "async_checkpoints", "tracker"}  # they do not change what the run computes
# keys a NaN stop's advice names: they change what the run computes from the resumed step on, so the step each change
# took effect is logged (log.jsonl, kind "resume") and config.json records it under "resumes"
RESUME_TUNABLE_KEYS = ("muon_lr", "embed_lr", "head_lr", "grad_clip")


def refuse_more_cycles(was, now):
    """A q0 run may be extended on resume, num_cycles larger, when its first cycles are then exactly those of the
    longer run: its last cycle end skipped the teacher and the noise (q0.Q0Plan.at_save), so no noise schedule (it
    spans num_cycles), no re-init (variants.py's chain), no teacher due at that cycle end. -> None, or why not."""
    if was["mode"] != "q0":
        return "mode=chain re-initialises at every cycle end but the last"
    if was["perturb_scale_start"] or was["perturb_scale_end"]:
        return "the perturbation noise's schedule spans num_cycles, so every cycle end's noise would change"
    first_teacher = max(1, was["distill_after_cycles"])  # the first cycle end whose snapshot teaches
    mixture = was.get("distill_teacher") == "mixture"
    if not mixture and first_teacher <= was["num_cycles"]:
        return f"the run's last snapshot (cycle {was['num_cycles']}) was never made a teacher"
    if mixture and first_teacher < now["num_cycles"]:
        return "the mixture teacher scores every snapshot on fitness, and the run's last one was not"
    return None


def refuse_larger_budget(was, now):
    """A larger budget is more cycles of the same allocation (num_cycles's rule then applies), or refused."""
    if (was["num_trajectories"], was["epochs_per_cycle"]) != (now["num_trajectories"], now["epochs_per_cycle"]):
        return (f"it takes another allocation ({now['num_trajectories']} x {now['epochs_per_cycle']:g}-epoch cycles "
                f"against {was['num_trajectories']} x {was['epochs_per_cycle']:g}; q0.ALLOCATIONS)")
    return None


GROW_KEYS = {"budget": refuse_larger_budget,  # first: the budget sets num_cycles and the allocation
             "num_cycles": refuse_more_cycles,  # more cycles: the longer run, bit for bit, where that holds
             "ensemble_size": lambda was, now: None}  # member i depends only on (seed + i, i)


def current_config(record):
    """The config a run has now: config.json's "config" (as it was first started) with the changes of each resume
    applied in order ("resumes": [{"keys": {key: [old, new]}, "at": UTC time}])."""
    config = dict(record["config"])
    for resumed in record.get("resumes", []):
        config.update({k: new for k, (_, new) in resumed["keys"].items()})
    return config


def resume_changes(run_dir, was, now):
    """The keys a resume changes, {key: [old, new]}, or UserError naming the first that it may not: a key outside
    RESUME_SAFE_KEYS and RESUME_TUNABLE_KEYS that differs, or a GROW_KEYS key grown where the longer run would not
    begin with this one."""
    may_change = RESUME_SAFE_KEYS | set(RESUME_TUNABLE_KEYS)
    for key in dict.fromkeys([*GROW_KEYS, *was]):  # the keys that may grow first: a budget names its own cause
        if key not in was:
            continue
        value, new = was[key], now.get(key)
        if key in GROW_KEYS and key in now and new > value:
            if why := GROW_KEYS[key](was, now):
                raise UserError(f"cannot resume {run_dir}: config key '{key}' grows {value} -> {new}, but {why}. "
                                f"Use {key}={value}, or train the longer run in a new --out_dir")
        elif key not in may_change and json.dumps(new) != json.dumps(value):
            raise UserError(f"cannot resume {run_dir}: config key '{key}' was {value!r}, now {new!r}, which changes "
                            f"what the run computes. Use the original value or a new --out_dir")
    return {k: [was[k], v] for k, v in now.items() if k in was and k != "resume" and json.dumps(was[k]) != json.dumps(v)}
