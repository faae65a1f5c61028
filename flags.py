"""train.py's command line: every flag with its default, and --config files of flag values.

The recipe's flags default by what the run does (RECIPES, filled in by `recipe_defaults` once the
teacher is loaded). A masked-LM teacher: the released DistilBERT run's values (Sanh et al. 2019):
loss weights 5/2/1, temperature 2, AdamW 5e-4 with betas (0.9, 0.98) and eps 1e-6, 5% warmup,
clipping at 5. A teacher fine-tuned on a task: DistilBERT (D)'s task distillation (Hugging Face's
run_squad_w_distillation.py): KD 0.5 at temperature 2 and the hard-label loss 0.5, AdamW with
eps 1e-8, no warmup, clipping at 1, at 1e-4 rather than its 5e-5 (which left accuracy behind on
short runs of two tasks: docs/tasks.md, "The learning rate"). Fine-tuning (--task, no teacher): the labels alone, with
the same optimizer. A --config file, JSON or YAML (.yaml/.yml, with PyYAML installed), sets any of them by flag
name ("alpha_kd" or "alpha-kd"); flags given on the command line win over the file.
"""

import argparse
import json
import math
import os
import sys

from checkpoint import read_run_json
from distil import DistilConfig
from tasks import KINDS
from token_cache import default_cache_dir

RECIPE = DistilConfig()  # the losses' defaults are the recipe's own (DistilBERT's), written once, in distil.py


def read_config(path):
    """A --config file as a dict of flag values: JSON, or YAML for a .yaml/.yml name (PyYAML, an
    optional package, is imported only then). Raises SystemExit with one line naming the file, and
    the line and column of a syntax error."""
    is_yaml = path.lower().endswith((".yaml", ".yml"))
    kind = "YAML" if is_yaml else "JSON"
    if is_yaml:
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"error: --config {path}: a YAML config needs PyYAML: pip install pyyaml") from None
        syntax_error = yaml.YAMLError
    else:
        syntax_error = json.JSONDecodeError
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) if is_yaml else json.load(f)
    except OSError as e:
        raise SystemExit(f"error: --config {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SystemExit(f"error: --config {path}: not UTF-8 text; save it as UTF-8") from None
    except syntax_error as e:
        if is_yaml:  # PyYAML counts lines and columns from 0, and its message spans several lines
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or type(e).__name__
            line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        else:
            line, column, problem = e.lineno, e.colno, e.msg
        where = f" at line {line}, column {column}" if line else ""
        raise SystemExit(f"error: --config {path}: not valid {kind}{where} ({problem})") from None
    if not isinstance(config, dict):
        raise SystemExit(f"error: --config {path}: a {'YAML mapping' if is_yaml else 'JSON object'} of flag names "
                         "and values is expected")
    return config


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help names each flag's default: appended where the help text does not already say it (a
    default of None or False, an unset option or switch, is described by the text itself)."""

    def _get_help_string(self, action):
        text = action.help or ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        unset = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        if not unset and "default" not in text and not switch \
                and action.option_strings:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def negative_values(argv, parser):
    """argv with a flag's value that starts with a minus and a digit joined to its flag ("--layers -1,2"
    as "--layers=-1,2"): argparse takes "-1,2" for an option and reports a missing value, where the
    flag's own check names the real problem (a layer out of range)."""
    takes_value = {s for a in parser._actions if a.nargs is None and a.option_strings for s in a.option_strings
                   if not isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))}
    argv, out, i = list(argv), [], 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and len(argv[i + 1]) > 1 and argv[i + 1][0] == "-" \
                and argv[i + 1][1].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def run_defaults(out_dir):
    """The flags a run in `out_dir` was started with (OUT/run.json), for --resume: {flag dest: value},
    without the ones that name this invocation (out, resume, config) or were derived from others.
    Empty when the folder holds no run.json."""
    saved = read_run_json(out_dir)
    # "dtype" is what the run computed in (never "auto"), so a resume keeps its precision
    return {k: v for k, v in saved.items() if k not in ("out", "resume", "config", "dtype_requested", "dtype_reason")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (python train.py --help lists the flags)")
    a = p.add_argument
    a("--config", help="JSON or YAML file of flag values (keys are flag names); flags on the command line win")
    # what to distil, on what
    a("--teacher", help="teacher: a hub name or a local folder holding a masked LM, or a model fine-tuned for "
      "sequence classification or token classification (task distillation), or a sentence-transformers folder "
      "(sentence embeddings)")
    a("--student", metavar="FOLDER", help="start the student from this checkpoint (same tokenizer) instead of the "
      "teacher's layers; a task run gives it a fresh task head unless its own predicts the same labels")
    a("--task", choices=KINDS, help="fine-tune --student on labelled data, with no task teacher: the task, "
      "labels taken from the data (or --labels)")
    a("--labels", help="with --task: the label names, comma-separated, in id order (default: from the data)")
    a("--tokenizer", help="tokenizer folder, if not the teacher's own")
    a("--train", help="training corpus: .txt (one document per line), .csv or .jsonl (tasks: .csv, .jsonl or a "
      "dataset)")
    a("--valid", help="held-out set: perplexity (masked LM), the task's scores, or the agreement of the sentence "
      "embeddings with the teacher's (and a linear probe where the texts have labels)")
    a("--text-column", help="column (.csv) or field (.jsonl) holding the text (default: text; token "
      "classification: tokens, a list of words)")
    a("--text-pair-column", help="tasks on text pairs: the column of each pair's second text")
    a("--label-column", help="tasks: the column of the labels (default: label; token classification: ner_tags)")
    a("--label-map", help="tasks: the data's labels as the teacher's, DATA:TEACHER pairs (ids or names), e.g. "
      "0:2,1:0,2:1 when the data numbers its labels in another order (default: names matched, ids taken as the "
      "teacher's)")
    a("--out", help="output folder: the student, checkpoints/ and metrics.jsonl")
    a("--cache-dir", default=default_cache_dir(), help="where tokenized corpora are cached (and --augment's rewrites, "
      "--teacher-cache's logits)")
    # task runs: TinyBERT's data augmentation, and the teacher's logits computed once
    a("--augment", type=int, default=0, help="tasks: rewrite each training record up to N times with a masked LM "
      "(TinyBERT's augmentation); the rewrites carry no label and learn from the teacher alone (0 = off)")
    a("--augment-model", metavar="FOLDER", help="with --augment: the fill-mask model that rewrites, of the teacher's "
      "tokenizer (e.g. the masked LM the task teacher was fine-tuned from); required")
    a("--augment-seed", type=int, help="with --augment: the rewrites' seed (default: --seed)")
    a("--augment-top-k", type=int, default=15, help="with --augment: candidates per word (TinyBERT's K)")
    a("--augment-prob", type=float, default=0.4, help="with --augment: each word's chance to be replaced (TinyBERT's p_t)")
    a("--teacher-cache", action="store_true", help="tasks: compute the teacher's logits of every training record once, "
      "cached beside the token cache, and read them instead of running the teacher each step (KD/MSE on logits only)")
    # the student
    a("--layers", help="teacher layers to keep, 0-based, e.g. 0,2,4,7,9,11 (default: an evenly spread half)")
    a("--student-init", default="teacher", choices=["teacher", "random"],
      help="copy the teacher's weights (the recipe) or start from random ones (ablation)")
    a("--student-hidden", type=int, help="a narrower student: its hidden size (default: the teacher's)")
    a("--student-heads", type=int, help="with --student-hidden: its attention heads (default: the teacher's)")
    a("--student-arch", default="teacher", choices=["teacher", "distilbert"],
      help="the student's class: the teacher's own, or DistilBertForMaskedLM converted exactly from a BERT teacher")
    # data
    a("--seq-len", type=int, help="tokens per sequence, special tokens included (default: 128, or the "
      "teacher's positions if fewer)")
    a("--no-pack", dest="pack", action="store_false",
      help="one document per sequence (grouped by length) instead of packing documents together")
    a("--min-tokens", type=int, default=5, help="drop documents with fewer tokens than this")
    a("--mlm-prob", type=float, default=0.15, help="fraction of tokens to predict")
    a("--mlm-smoothing", type=float, default=0.0,
      help="mask rare tokens more: P(mask) ~ count^-s (0.7 in the original DistilBERT run; 0 = uniform)")
    # optimisation
    a("--batch-size", type=int, default=32, help="sequences per device per micro-step")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--global-batch", type=int, help="sequences per optimizer step over all ranks: --grad-accum follows from "
      "it and the number of ranks, so a restart on fewer nodes is the same run (instead of --grad-accum)")
    a("--max-steps", type=int, help="optimizer steps (wins over --epochs)")
    a("--epochs", type=float, default=3.0, help="passes over the training data")
    a("--lr", type=float, help="peak learning rate (default: 5e-4 masked LM, 1e-4 tasks)")
    a("--warmup", type=float, help="fraction of the steps spent warming up the learning rate (0.05; tasks 0)")
    a("--weight-decay", type=float, default=0.0, help="AdamW decay, on weight matrices only")
    a("--adam-betas", help="default 0.9,0.98 (masked LM), 0.9,0.999 (tasks)")
    a("--adam-eps", type=float, help="default 1e-6 (masked LM), 1e-8 (tasks)")
    a("--clip", type=float, help="gradient-norm clipping, 0 = off (default 5; tasks 1)")
    # the recipe (defaults: RECIPES)
    a("--temperature", type=float, default=RECIPE.temperature, help="softens both models' distributions in KD")
    a("--alpha-kd", type=float, help="KD on the teacher's predictions (5; tasks 0.5)")
    a("--alpha-mlm", type=float, help="masked-LM loss (2; tasks: off)")
    a("--alpha-label", type=float, help="tasks: the hard-label loss (0.5; 1 when fine-tuning)")
    a("--alpha-cos", type=float, help="cosine loss of the last hidden states (1; tasks: off)")
    a("--alpha-mse", type=float, default=RECIPE.alpha_mse, help="squared error of the logits (off in the recipe)")
    a("--alpha-embed", type=float, help="sentence-embedding teachers: the loss of the sentence embeddings (1; "
      "others: off)")
    a("--embed-loss", default=RECIPE.embed_loss, choices=["mse", "cos"],
      help="the sentence-embedding loss: MSE (sentence-transformers' MSELoss) or 1 - cosine")
    a("--kd-on", default=RECIPE.kd_on, choices=["all", "masked"],
      help="positions the KD/MSE terms read: every token (released DistilBERT) or the masked ones (faster)")
    # intermediate layers (off in the recipe): pairs of layers as in hidden_states, 0 = embeddings
    a("--layer-map", help="teacher:student layer pairs, e.g. 0:0,3:1,6:2 (default: the layers kept, and 0:0)")
    a("--alpha-hidden", type=float, default=RECIPE.alpha_hidden, help="hidden-state loss on the --layer-map pairs")
    a("--hidden-loss", default=RECIPE.hidden_loss, choices=["mse", "cos"], help="MSE (TinyBERT) or cosine")
    a("--alpha-attn", type=float, default=RECIPE.alpha_attn, help="attention loss on the --layer-map pairs")
    a("--attn-loss", default=RECIPE.attn_loss, choices=["kl", "mse"],
      help="KL of attention distributions (MiniLM) or MSE of raw scores (TinyBERT)")
    a("--alpha-relation", type=float, default=RECIPE.alpha_relation, help="MiniLMv2 q/k/v relations of the last --layer-map pair")
    a("--relation-heads", type=int, default=RECIPE.relation_heads, help="relation heads (default: the student's attention heads)")
    # machinery
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="autocast dtype; auto = bf16 on a GPU that has it (else fp16) and on a CPU with AMX (else fp32); "
           "the run's first line says which, and a resume keeps it")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = a GPU if there is one")
    a("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
      help="torch.compile the whole step (both forwards, the losses, the backward) into one graph; auto = on a "
           "GPU, off on a CPU (where compiling costs more than it saves in a short run: docs/speed.md)")
    a("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
      help="torch.compile's mode: reduce-overhead replays the step as CUDA graphs (fewest launches; more memory)")
    a("--ddp-bf16-grads", action="store_true", help="all-reduce the gradients in bf16 under torchrun (half the "
      "bytes; each gradient rounded to bf16 on the wire, relative error about 0.4%%)")
    a("--num-workers", type=int, help="DataLoader processes building batches ahead of the step "
      "(default: up to 4 per GPU; 0 on a CPU, where batches cost about 0.5%% of a step)")
    a("--seed", type=int, default=42, help="data order, masks, dropout and fresh task heads follow from it")
    a("--eval-every", type=int, default=500, help="steps between evaluations on --valid")
    a("--save-every", type=int, default=1000, help="steps between checkpoints (OUT/checkpoints, for --resume)")
    a("--log-every", type=int, default=10, help="steps between lines of metrics.jsonl")
    a("--keep", type=int, default=3, help="checkpoints to keep, the newest (0 = all); each holds the student and its optimizer "
      "state (about 3x the model): once the run is done, rm -r OUT/checkpoints frees them")
    a("--resume", nargs="?", const=True, default=False, choices=["auto"],
      help="continue the run in --out from its newest checkpoint; --resume auto: continue it if there is one, "
      "else start (what torchrun --max-restarts needs); a finished run says so and exits 0")
    a("--save-every-minutes", type=float, default=30.0,
      help="also checkpoint when this many minutes have passed since the last save (0 = off)")
    a("--collective-timeout", type=float, default=120.0, help="seconds a rank waits in a collective for the "
      "others before it gives up (a lost rank; NCCL): longer than a checkpoint write or an evaluation")
    a("--cache-only", action="store_true", help="tokenize --train and --valid into --cache-dir, then exit (run "
      "it on each node before a multi-node run)")
    a("--max-bad-steps", type=int, default=10,
      help="stop after this many consecutive steps with a non-finite loss or gradient")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    # the ecosystem (each optional package is imported only when asked for)
    a("--log", default="", help="also send the metrics to tensorboard, wandb or both (tensorboard,wandb)")
    a("--wandb-project", help="W&B project (default: $WANDB_PROJECT, else bert-distil)")
    a("--language", help="language code(s) for the model card, e.g. en or de,fr (default: the teacher card's)")
    a("--push-to-hub", metavar="NAME", help="upload the finished student to this Hugging Face Hub repository")

    argv = negative_values(sys.argv[1:] if argv is None else argv, p)
    pre, _ = p.parse_known_args(argv)
    if pre.resume and pre.out:  # the run's own flags, unless given again (the command line and --config win)
        known = {action.dest for action in p._actions}
        p.set_defaults(**{k: v for k, v in run_defaults(pre.out).items() if k in known})
    if pre.config:
        config = read_config(pre.config)
        known = {action.dest for action in p._actions}
        # a JSON list ("layers": [0, 2, 4], "adam_betas": [0.9, 0.98]) means what its comma form means
        config = {k.replace("-", "_"): ",".join(map(str, v)) if isinstance(v, list) else v
                  for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(config) - known)
        if unknown:
            raise SystemExit(f"error: --config {pre.config}: unknown keys {unknown}; keys are flag names")
        for action in p._actions:  # argparse checks a flag's choices on the command line only
            if action.choices is None or action.dest not in config:
                continue
            if isinstance(config[action.dest], bool) and "on" in action.choices:  # "compile": true, as it once was
                config[action.dest] = "on" if config[action.dest] else "off"
            if config[action.dest] not in action.choices:
                raise SystemExit(f"error: --config {pre.config}: {action.option_strings[0]} {config[action.dest]!r} "
                                 f"is not one of {', '.join(map(str, action.choices))}")
        p.set_defaults(**config)
    args = p.parse_args(argv)
    for flag in ("train", "out") + (() if args.task else ("teacher",)):
        if not getattr(args, flag):
            p.error(f"--{flag} is required (on the command line or in --config)")
    command_line = sys.argv[1:] if argv is None else argv  # a --config file's grad_accum gives way to it
    given = {a.split("=")[0] for a in command_line}
    if "--grad-accum" in given and "--global-batch" not in given and not (pre.config and "global_batch" in config):
        args.global_batch = None  # a resume's run.json records the global batch; --grad-accum given again wins
    if args.global_batch is not None and "--grad-accum" in given:
        p.error("--global-batch sets --grad-accum (from the number of ranks): pass one of them")
    if args.task and not args.student:
        p.error("--task fine-tunes a pre-trained checkpoint: pass it as --student FOLDER")
    problem = check_ranges(args)
    if problem:
        p.error(problem)
    return args


# (flag, kind, test, what a valid value is): a flag's value must be of its kind (whole numbers for
# "int"; finite numbers for "float") and pass its test. Checked before anything is loaded, so that
# a value that cannot work stops the run at once instead of at the first step, or hours later.
RANGES = [
    ("seq_len", "int", lambda v: v >= 3, "at least 3 (the two special tokens and one of text)"),
    ("min_tokens", "int", lambda v: v >= 1, "at least 1"),
    ("mlm_prob", "float", lambda v: 0 < v <= 1, "in (0, 1]: the fraction of tokens to predict"),
    ("mlm_smoothing", "float", lambda v: v >= 0, "at least 0 (0 = uniform)"),
    ("batch_size", "int", lambda v: v >= 1, "at least 1"),
    ("grad_accum", "int", lambda v: v >= 1, "at least 1"),
    ("global_batch", "int", lambda v: v >= 1, "at least 1"),
    ("max_steps", "int", lambda v: v >= 1, "at least 1 (or leave it out to train for --epochs)"),
    ("epochs", "float", lambda v: v > 0, "above 0"),
    ("lr", "float", lambda v: v > 0, "above 0"),
    ("warmup", "float", lambda v: 0 <= v < 1, "in [0, 1): the fraction of the steps spent warming up"),
    ("weight_decay", "float", lambda v: v >= 0, "at least 0"),
    ("adam_eps", "float", lambda v: v > 0, "above 0"),
    ("clip", "float", lambda v: v >= 0, "at least 0 (0 = no clipping)"),
    ("temperature", "float", lambda v: v > 0, "above 0 (the recipe uses 2)"),
    ("alpha_kd", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("alpha_mlm", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("alpha_label", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("alpha_cos", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("alpha_mse", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("alpha_embed", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("alpha_hidden", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("alpha_attn", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("alpha_relation", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("relation_heads", "int", lambda v: v >= 0, "at least 0 (0 = the student's attention heads)"),
    ("student_hidden", "int", lambda v: v >= 1, "at least 1"),
    ("student_heads", "int", lambda v: v >= 1, "at least 1"),
    ("eval_every", "int", lambda v: v >= 1, "at least 1"),
    ("save_every", "int", lambda v: v >= 1, "at least 1"),
    ("save_every_minutes", "float", lambda v: v >= 0, "at least 0 (0 = off)"),
    ("collective_timeout", "float", lambda v: v > 0, "above 0"),
    ("log_every", "int", lambda v: v >= 1, "at least 1"),
    ("keep", "int", lambda v: v >= 0, "at least 0 (0 = keep all)"),
    ("max_bad_steps", "int", lambda v: v >= 1, "at least 1"),
    ("seed", "int", lambda v: v >= 0, "at least 0"),
    ("num_workers", "int", lambda v: v >= 0, "at least 0 (0 = batches built in the training process)"),
    ("augment", "int", lambda v: v >= 0, "at least 0 (0 = off): the rewrites per record"),
    ("augment_seed", "int", lambda v: v >= 0, "at least 0"),
    ("augment_top_k", "int", lambda v: v >= 1, "at least 1"),
    ("augment_prob", "float", lambda v: 0 < v <= 1, "in (0, 1]: each word's chance to be replaced"),
]


def check_ranges(args):
    """The first flag whose value cannot work, as one line ("--flag VALUE: must be ..."), or None.

    Numbers from --config files arrive as JSON gave them (argparse converts only strings), so a 2.5
    for --batch-size or true for --lr is caught here too; NaN and infinities are refused as well."""
    for name, kind, test, valid in RANGES:
        value = getattr(args, name)
        if value is None and (name in ("max_steps", "student_hidden", "student_heads", "num_workers", "seq_len",
                                       "global_batch", "augment_seed")
                              or name in RECIPE_FLAGS):  # optional, or filled in by recipe_defaults
            continue
        flag = "--" + name.replace("_", "-")
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
            what = "a whole number"
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            what = "a finite number"
        if not ok:
            return f"{flag} {value}: must be {what}, {valid}"
        if not test(value):
            return f"{flag} {value}: must be {valid}"
    try:
        betas = [float(b) for b in str(args.adam_betas).split(",")]
    except ValueError:
        betas = []
    if args.adam_betas is not None and len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        return f"--adam-betas {args.adam_betas}: must be two numbers in [0, 1) separated by a comma, e.g. 0.9,0.98"
    alphas = ("kd", "mlm", "label", "cos", "mse", "hidden", "attn", "relation", "embed")
    # --alpha-embed left unset is on (1) for a sentence-transformers teacher only (a folder with modules.json)
    embed_unset_off = args.alpha_embed is None and not os.path.isfile(os.path.join(str(args.teacher), "modules.json"))
    if all(getattr(args, f"alpha_{k}") == 0 or (k == "embed" and embed_unset_off) for k in alphas):
        return "every --alpha-* is 0: turn on at least one loss"
    if (args.alpha_attn > 0 or args.alpha_relation > 0) and args.layer_map is not None:
        # 0 is the embeddings, which have no attention: an attention loss needs a pair of real layers
        try:
            pairs = [tuple(int(x) for x in pair.split(":")) for pair in str(args.layer_map).split(",") if pair.strip()]
        except ValueError:
            return None  # malformed: parse_layer_map says how, once the depths are known
        if not any(len(pair) == 2 and pair[0] > 0 and pair[1] > 0 for pair in pairs):
            flag = "--alpha-attn" if args.alpha_attn > 0 else "--alpha-relation"
            return (f"{flag} compares attention, which layer 0 (the embeddings) has not: --layer-map "
                    f"{args.layer_map} needs a pair of layers both above 0, e.g. --layer-map 0:0,12:6")
    return None


# The recipes' defaults, by what the run does (see the module's docstring for their sources).
_OPTIMIZER_MLM = {"lr": 5e-4, "adam_betas": "0.9,0.98", "adam_eps": 1e-6, "warmup": 0.05, "clip": 5.0}
# lr: DistilBERT (D) takes 5e-5; 1e-4 was as good or better on two tasks (docs/tasks.md, "The learning rate")
_OPTIMIZER_TASK = {"lr": 1e-4, "adam_betas": "0.9,0.999", "adam_eps": 1e-8, "warmup": 0.0, "clip": 1.0}
RECIPES = {
    "mlm": {"alpha_kd": RECIPE.alpha_kd, "alpha_mlm": RECIPE.alpha_mlm, "alpha_cos": RECIPE.alpha_cos, "alpha_label": 0.0,
            "alpha_embed": 0.0, **_OPTIMIZER_MLM},
    "task": {"alpha_kd": 0.5, "alpha_mlm": 0.0, "alpha_cos": 0.0, "alpha_label": 0.5, "alpha_embed": 0.0,
             **_OPTIMIZER_TASK},
    "finetune": {"alpha_kd": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, "alpha_label": 1.0, "alpha_embed": 0.0,
                 **_OPTIMIZER_TASK},
    # a sentence-transformers teacher: its own distillation example (MSE of the embeddings, AdamW 1e-4,
    # 10% warmup) with transformers' Trainer's betas/eps and sentence-transformers' clipping at 1
    "embed": {"alpha_kd": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, "alpha_label": 0.0, "alpha_embed": 1.0,
              "lr": 1e-4, "adam_betas": "0.9,0.999", "adam_eps": 1e-8, "warmup": 0.1, "clip": 1.0},
}
RECIPE_FLAGS = set(RECIPES["mlm"])


def recipe_defaults(args, kind, has_teacher=True):
    """Fill the recipe flags left unset with the defaults of the run: "mlm" (kind None), "task" (a
    task teacher) or "finetune" (no teacher); columns too. Raises SystemExit with one line for a
    loss this run cannot compute."""
    recipe = "mlm" if kind is None else "embed" if kind == "embedding" else ("task" if has_teacher else "finetune")
    for name, value in RECIPES[recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    token = kind == "token_classification"
    args.text_column = args.text_column or ("tokens" if token else "text")
    args.label_column = args.label_column or ("ner_tags" if token else "label")
    if kind is None and args.alpha_label > 0:
        raise SystemExit("error: --alpha-label is the hard-label loss of a task; a masked-LM teacher has none "
                         "(pass a fine-tuned teacher, or --task with --student to fine-tune)")
    if kind == "embedding":  # a sentence-embedding teacher has no logits and no labels
        uses = [f"--alpha-{k}" for k in ("kd", "mlm", "label", "mse") if getattr(args, f"alpha_{k}") > 0]
        if uses:
            raise SystemExit(f"error: {', '.join(uses)} read a model's logits, and a sentence-embedding teacher has "
                             "none: use --alpha-embed (and the layer losses --alpha-cos/-hidden/-attn/-relation)")
    elif args.alpha_embed > 0:
        raise SystemExit("error: --alpha-embed compares sentence embeddings: the teacher must be a "
                         "sentence-transformers folder (with modules.json); drop it")
    if kind is not None and args.alpha_mlm > 0:
        raise SystemExit("error: --alpha-mlm trains a masked LM; a task run has no masked tokens: drop it")
    if not has_teacher:
        uses = [f"--alpha-{k}" for k in ("kd", "cos", "mse", "hidden", "attn", "relation") if getattr(args, f"alpha_{k}") > 0]
        if uses:
            raise SystemExit(f"error: {', '.join(uses)} compare the student with a teacher, and --task fine-tunes "
                             "without one: pass a fine-tuned --teacher instead of --task, or drop them")
    problem = check_ranges(args)
    if problem:
        raise SystemExit(f"error: {problem}")
