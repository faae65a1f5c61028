"""What a train.py run reads, checked before anything is written or the process group starts:
the tokenizer, the recipe, the student and the data, for a masked-LM teacher (a corpus) or a
task (labelled data, tasks.py). Every problem is a one-line StudentError or DataError."""

from dataclasses import fields
from types import SimpleNamespace

import torch

from augment import augment_examples, check_augment_flags
from data import make_sequences, mask_spec
from token_cache import DataError, corpus_digest, corpus_note, load_corpus
from distil import DistilConfig, check_capture, parse_layer_map
from pretrained import check_student_vocabulary, load_student_checkpoint, load_tokenizer, task_kind, usable_positions
from student import StudentError, build_student, check_layers, make_student
from heldout import check_metrics
from precision import autocast_for
from teacher_cache import check_teacher_cache
from tasks import check_labelled, examples_digest, examples_note, labels_from_data, load_examples, parse_label_map


def load_inputs(args, global_batch, master, teacher, kind, device=None, autocast=None):
    """Tokenizer, recipe, student and data, each checked (one-line errors) before anything is written
    or the process group starts. `kind`: None for masked-LM distillation, else the task (tasks.py).

    Returns a namespace: tokenizer, layers (the teacher layers kept), cfg (distil.DistilConfig),
    student, train_data and valid_data (data.Sequences or tasks.Examples; valid None without
    --valid), spec (data.MaskSpec; None for a task), seq_len (the one used), steps_per_epoch, and
    train_corpus (what a resume checks: tokens, sequences, digest). `args` is only read. `device` and
    `autocast` are where --augment's masked LM runs (default: the CPU, fp32).
    A sentence-embedding teacher (kind "embedding"): embeddings.load_embedding_inputs."""
    check_augment_flags(args, kind, teacher)  # one line now, before anything is tokenized
    check_teacher_cache(args, kind, teacher)
    if kind == "embedding":
        from embeddings import load_embedding_inputs
        return load_embedding_inputs(args, global_batch, master, teacher)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers is not None else None
    except ValueError:
        raise StudentError(f"--layers {args.layers}: give teacher layer numbers separated by commas, e.g. 0,2,4")
    # the student: the teacher's layers (its head copied), or --student's checkpoint (a fresh task head)
    id2label = None
    if kind is not None:
        id2label = teacher.config.id2label if teacher is not None else labels_from_data(
            args.train, kind, args.label_column, args.text_column, args.labels and args.labels.split(","))
    if master and teacher is not None and kind in ("single_label_classification", "regression") and \
            getattr(teacher.config, "problem_type", None) is None:  # transformers' guess, said rather than made silently
        print(f"--teacher {args.teacher}: its config names no problem_type; read as {kind} "
              f"({'one output' if kind == 'regression' else f'{teacher.config.num_labels} outputs'}), as transformers "
              "does; if it is multi-label, set \"problem_type\": \"multi_label_classification\" in its config.json")
    if master and teacher is None and kind not in (None, "regression"):
        source = "--labels" if args.labels else "the data"
        print(f"labels (from {source}, in id order): {', '.join(str(id2label[i]) for i in sorted(id2label))[:200]}")
    if kind is not None:  # a task head drawn at random (--student, or a fresh head) is drawn from --seed, not
        torch.manual_seed(args.seed)  # from whatever the process's random state happens to be
    student = load_student_checkpoint(args.student, kind, id2label) if args.student else None
    if student is not None and kind is None and task_kind(student.config) is not None:
        raise StudentError(f"--student {args.student} is a {task_kind(student.config)} model and the teacher a masked "
                           "LM; start a masked-LM student from a masked LM (or drop --student)")
    source = teacher if teacher is not None else student
    tokenizer = load_tokenizer(source, args.teacher or args.student, args.tokenizer, masked_lm=kind is None,
                               words=kind == "token_classification")
    max_len = usable_positions(source)
    # 128, or the teacher's positions if fewer (args.seq_len stays None: a resume compares what was asked)
    seq_len = args.seq_len if args.seq_len is not None else min(128, max_len)
    if seq_len > max_len:
        raise DataError(f"--seq-len {seq_len} is longer than the teacher's {max_len} positions; "
                        f"use --seq-len {max_len} or less")
    if student is not None:
        if teacher is not None:
            check_student_vocabulary(tokenizer, args.student)
        if len(tokenizer) > student.get_input_embeddings().num_embeddings:
            raise StudentError(f"--student {args.student}: its embeddings have fewer rows than the teacher's "
                               "tokenizer has tokens; start from a checkpoint of the teacher's tokenizer")
        if layers is not None:  # a subset of the checkpoint's own layers
            student = make_student(student, check_layers(layers, student.config.num_hidden_layers))
        layers = list(range(student.config.num_hidden_layers))
        if master and student.fresh_weights:
            print(f"--student {args.student}: fresh task head ({', '.join(student.fresh_weights[:4])})")
    n_teacher_layers = teacher.config.num_hidden_layers if teacher is not None else len(layers)
    if not args.student:
        layers = check_layers(layers, n_teacher_layers)  # now, not after tokenizing the corpus
    cfg = recipe_config(args, layers, n_teacher_layers, teacher)
    if not args.student:
        if kind is not None and args.student_arch == "distilbert":
            raise StudentError("--student-arch distilbert converts masked LMs only; drop it for a task teacher")
        student = build_student(teacher, layers, args.student_init, args.student_arch, args.student_hidden,
                                args.student_heads, compares_hidden_states=cfg.needs_hidden_states())
    if kind is None and getattr(args, "label_map", None):
        raise DataError("--label-map maps a task's labels; a masked-LM run has none: drop it")
    train_data, valid_data, spec, train_corpus = load_data(args, kind, tokenizer, id2label, seq_len, teacher, master,
                                                           device, autocast)
    n_sequences = len(train_data.starts)
    # An epoch is a whole number of global batches, whatever their split over ranks and micro-steps,
    # so that a run resumed on another number of GPUs (same global batch) sees the same data.
    steps_per_epoch = n_sequences // global_batch
    if steps_per_epoch < 1:
        raise DataError(f"{args.train} gives {n_sequences} sequences of --seq-len {seq_len}: too few "
                        f"for one step of {global_batch}; lower --batch-size "
                        "or --grad-accum, or pass a longer corpus")
    left_out = n_sequences - steps_per_epoch * global_batch
    if kind is not None and left_out and master and (args.max_steps is None or args.max_steps >= steps_per_epoch):
        print(epoch_remainder_note(args.train, n_sequences, steps_per_epoch, global_batch, args.batch_size))
    return SimpleNamespace(tokenizer=tokenizer, layers=layers, cfg=cfg, student=student, train_data=train_data,
                           valid_data=valid_data, spec=spec, seq_len=seq_len, steps_per_epoch=steps_per_epoch,
                           train_corpus=train_corpus)


def recipe_config(args, layers, n_teacher_layers, teacher):
    """The run's distil.DistilConfig: every field is the flag of the same name, --layer-map's pairs
    checked against the student's `layers` and the teacher's depth, and a teacher whose attention
    cannot be captured refused when a loss reads it. StudentError (one line) on a bad value."""
    try:
        if args.student and args.layer_map is None and (args.alpha_hidden or args.alpha_attn or args.alpha_relation):
            raise ValueError("a --student checkpoint has no layers copied from the teacher: pass --layer-map")
        layer_map = parse_layer_map(args.layer_map, layers, n_teacher_layers)
        cfg = DistilConfig(**{f.name: getattr(args, f.name) for f in fields(DistilConfig) if f.name != "layer_map"},
                           layer_map=layer_map)
        if cfg.needs_attention():
            check_capture(teacher)
    except ValueError as e:
        raise StudentError(str(e))
    return cfg


def load_data(args, kind, tokenizer, id2label, seq_len, teacher, master, device=None, autocast=None):
    """The training and held-out data, read, tokenized once (cached) and counted: a masked-LM corpus
    cut into sequences (data.make_sequences) with its masking spec, or a task's labelled examples
    (tasks.load_examples), with --augment's unlabelled rewrites appended (augment.augment_examples, on
    `device` under `autocast`). What reading skipped or guessed is said in one line. Returns
    (train_data, valid_data or None, spec or None, train_corpus: what a resume checks)."""
    if kind is not None:
        label_map = parse_label_map(getattr(args, "label_map", None), id2label)
        read = lambda path: load_examples(path, tokenizer, kind, id2label, seq_len, args.cache_dir,
                                          args.text_column, args.label_column, args.text_pair_column, label_map)
        if args.valid:
            check_metrics(kind, id2label)
        train_data = read(args.train)
        valid_data = read(args.valid) if args.valid else None
        check_labelled(train_data, args.train, "--train", args.alpha_label)  # (before the notes: a refusal
        if valid_data is not None:                                           # is the only line then)
            check_labelled(valid_data, args.valid, "--valid")
        for path, data in ((args.train, train_data), (args.valid, valid_data)):
            if data is not None and master:
                print(examples_note(data, path))
        if teacher is None and train_data.meta["labelled"] < train_data.meta["records"] and master:
            print("fine-tuning without a teacher: the records without a label teach nothing")
        if getattr(args, "augment", 0):
            train_data = augment_examples(args, train_data, tokenizer, device or torch.device("cpu"),
                                          autocast or autocast_for(torch.device("cpu"), torch.float32), master)
        train_corpus = {"tokens": int(train_data.lengths.sum()), "sequences": len(train_data.starts),
                        "sha256": examples_digest(train_data), "labels": [id2label[i] for i in sorted(id2label)]}
        return train_data, valid_data, None, train_corpus

    # Each rank takes the cache lock in turn: the first tokenizes, the others then just load it.
    read = lambda path: load_corpus(path, tokenizer, args.cache_dir, args.text_column, args.min_tokens,
                                    progress=master and args.progress)
    corpus = read(args.train)
    train_data = make_sequences(corpus, seq_len, args.pack)
    valid_corpus = read(args.valid) if args.valid else None
    valid_data = make_sequences(valid_corpus, seq_len, args.pack) if args.valid else None
    for note in (corpus_note(c) for c in (corpus, valid_corpus) if c is not None):
        if note and master:  # what reading skipped (empty or null texts) is said, never silent
            print(note)
    spec = mask_spec(tokenizer, corpus, args.mlm_smoothing, args.mlm_prob)
    train_corpus = {"tokens": len(corpus.tokens), "sequences": len(train_data.starts),
                    "sha256": corpus_digest(corpus), "cache": corpus.cache_name}
    return train_data, valid_data, spec, train_corpus


def epoch_remainder_note(path, n_records, steps_per_epoch, global_batch, batch_size):
    """One line on the records an epoch leaves out: an epoch is a whole number of global batches (so
    that a run resumed on another number of GPUs sees the same data), and the remainder, a different
    one each epoch, is not seen in that epoch. With the few records of a few-shot set it can be a
    large share; a --batch-size that divides them is suggested when one is near."""
    left_out = n_records - steps_per_epoch * global_batch
    split = global_batch // batch_size  # micro-steps x ranks
    fits = next((b for b in range(batch_size, max(1, batch_size // 2) - 1, -1) if n_records % (b * split) == 0), None)
    hint = f"; --batch-size {fits} uses them all" if fits else ""
    return (f"{path}: an epoch is {steps_per_epoch} steps of {global_batch} records, so {left_out} of the {n_records} "
            f"records ({100 * left_out / n_records:.0f}%) are left out of each epoch (a different {left_out} each "
            f"time){hint}")
