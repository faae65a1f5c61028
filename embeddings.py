"""Sentence-embedding teachers: distil a sentence-transformers model (all-MiniLM, bge, e5, gte, ...)
into a student made of some of its layers, by regressing the teacher's sentence embeddings on
unlabelled texts (sentence-transformers' own distillation recipe), and save the student as a
folder that `SentenceTransformer(OUT)` loads.

    python train.py --teacher path/to/all-MiniLM-L6-v2 --train texts.txt --valid held-out.csv --out runs/emb

The teacher is recognised by its modules.json (read_sentence_folder): a Transformer, one Pooling
module, optional Dense modules and an optional Normalize, the modules such a model is made of.
This file reads and writes those folders itself rather than importing sentence-transformers: the
format is four small JSON files and one weight file per Dense module, the step must run the
models as train.py runs every model (autocast, DDP, no host syncs, the layer losses reading
hidden states), and the hard dependencies stay torch, transformers, numpy and tqdm. The tests load
what this file writes with sentence-transformers itself (requirements-test.txt).

The models are transformers' base models (AutoModel: BertModel, ...) with the modules after them
attached: `model.sentence` (a dict: pooling mode, normalize, max_seq_length, prompts, similarity
function) and `model.sentence_dense` (an nn.ModuleList of the Dense modules, trainable parameters
of the student, so the optimizer, DDP and the checkpoints cover them). A student narrower than its
teacher gets one more Dense module first, a learned map from its width to the teacher's (started
as [I; 0]), saved as a Dense module with the identity activation: sentence-transformers runs it as
part of the model.

    embedding = Normalize(Dense_k(...Dense_1(Pool(transformer(text)))))     # as the folder says
    loss = alpha_embed * EMBED(student, teacher) + the layer losses (distil.layer_terms)
"""

import json
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import batch_rows, collate, make_sequences
from distil import layer_terms, prepare_layer_losses, prepared_mask, unwrap, weighted
from losses import embedding_loss
from student import StudentError, build_student, check_layers, default_layers
from token_cache import DataError, corpus_digest, corpus_note, load_corpus, read_documents, read_records

KIND = "embedding"  # the run's kind, as a task teacher's is one of tasks.KINDS
MODULES = ("Transformer", "Pooling", "Dense", "Normalize")  # what a folder may hold, in this order
POOLING = ("mean", "cls", "max", "mean_sqrt_len_tokens")
LEGACY_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}
ACTIVATIONS = {"torch.nn.modules.activation.Tanh": nn.Tanh, "torch.nn.modules.linear.Identity": nn.Identity}


# ---------------------------------------------------------------------------------------------
# 1. Reading a sentence-transformers folder
# ---------------------------------------------------------------------------------------------

def is_sentence_folder(path):
    """Whether `path` is a folder sentence-transformers saved (it holds modules.json)."""
    return bool(path) and os.path.isfile(os.path.join(os.path.expanduser(path), "modules.json"))


def _json(path, default=None):
    if not os.path.isfile(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise StudentError(f"{path}: not readable JSON ({e}); re-save the model with sentence-transformers")


def read_sentence_folder(folder, flag="--teacher"):
    """What a sentence-transformers folder computes, checked: a dict with transformer (the folder
    of the Hugging Face model), pooling (one of POOLING), include_prompt, dense (a list of
    (config, weights file)), normalize, max_seq_length, do_lower_case and st_config (prompts,
    default_prompt_name, similarity_fn_name). Both the classic layout (sentence_transformers.models.X,
    pooling_mode_*_tokens flags) and sentence-transformers 5/6's are read. Anything else (another
    module, a pooling mode or activation it has no copy of, modules out of order) is a one-line
    StudentError naming the module and what it reads."""
    modules = _json(os.path.join(folder, "modules.json"))
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise StudentError(f"{flag} {folder}: modules.json is not a list of modules with a 'type'")
    names = [m["type"].rsplit(".", 1)[-1] for m in modules]
    for m, name in zip(modules, names):
        if name not in MODULES:
            raise StudentError(f"{flag} {folder}: modules.json names {m['type']} (module {m.get('name', '?')}), which "
                               f"this project cannot hold; it reads {', '.join(MODULES)} modules (a BERT-family "
                               "encoder, one pooling, optional Dense layers and normalisation)")
    order = [MODULES.index(n) for n in names]
    if names[:2] != ["Transformer", "Pooling"] or order != sorted(order) or names.count("Normalize") > 1:
        raise StudentError(f"{flag} {folder}: modules {' -> '.join(names)}; this project reads Transformer -> Pooling "
                           "-> Dense (any number) -> Normalize (optional), in that order")
    paths = [os.path.join(folder, m.get("path", "")) for m in modules]
    transformer = paths[0]
    bert_config = _json(os.path.join(transformer, "sentence_bert_config.json"), {})
    if bert_config.get("transformer_task", "feature-extraction") != "feature-extraction":
        raise StudentError(f"{flag} {folder}: its Transformer module runs {bert_config['transformer_task']!r}; this "
                           "project reads feature-extraction encoders (token embeddings)")
    pooling = _json(os.path.join(paths[1], "config.json"), {})
    modes = pooling.get("pooling_mode") or [mode for key, mode in LEGACY_POOLING.items() if pooling.get(key)] or "mean"
    modes = [modes] if isinstance(modes, str) else list(modes)
    bad_flags = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k not in LEGACY_POOLING]
    if len(modes) != 1 or modes[0] not in POOLING or bad_flags:
        raise StudentError(f"{flag} {folder}: pooling {', '.join(modes + bad_flags)} in {paths[1]}/config.json; this "
                           f"project pools with one of {', '.join(POOLING)}")
    dense = []
    for path in paths[2:2 + names.count("Dense")]:
        config = _json(os.path.join(path, "config.json"), {})
        activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
        weights = next((os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")
                        if os.path.isfile(os.path.join(path, f))), None)
        if activation not in ACTIVATIONS or config.get("use_residual") or weights is None:
            why = "no weights" if weights is None else f"activation {activation}" + \
                (" with a residual" if config.get("use_residual") else "")
            raise StudentError(f"{flag} {folder}: Dense module {path} has {why}; this project reads Dense modules with "
                               "weights and a Tanh or identity activation")
        dense.append((config, weights))
    st_config = _json(os.path.join(folder, "config_sentence_transformers.json"), {})
    max_seq_length = bert_config.get("max_seq_length")
    if max_seq_length is None:  # sentence-transformers 6 keeps it as the tokenizer's model_max_length
        limit = _json(os.path.join(transformer, "tokenizer_config.json"), {}).get("model_max_length")
        max_seq_length = limit if isinstance(limit, int) and limit < 1_000_000 else None  # (1e30: unset)
    return {"transformer": transformer, "pooling": modes[0], "include_prompt": pooling.get("include_prompt", True),
            "dense": dense, "normalize": names[-1] == "Normalize", "max_seq_length": max_seq_length,
            "do_lower_case": bool(bert_config.get("do_lower_case", False)),
            "st_config": {k: st_config[k] for k in ("prompts", "default_prompt_name", "similarity_fn_name")
                          if k in st_config}}


def dense_module(in_features, out_features, bias=True, activation="torch.nn.modules.linear.Identity"):
    """sentence-transformers' Dense: activation(linear(x)), as an nn.Sequential (its state keys are
    renamed to Dense's 'linear.*' on saving)."""
    module = nn.Sequential(nn.Linear(in_features, out_features, bias=bias), ACTIVATIONS[activation]())
    module.activation_name = activation
    return module


def load_dense(config, weights):
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file  # (a dependency of transformers)
        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    module = dense_module(config["in_features"], config["out_features"], config.get("bias", True),
                          config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    try:
        module[0].load_state_dict({k.split(".", 1)[-1]: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise StudentError(f"{weights}: its weights do not fit a Dense {config['in_features']} -> "
                           f"{config['out_features']} ({str(e).splitlines()[0]}); re-save the model") from None
    return module


def load_sentence_model(folder, flag="--teacher"):
    """The base model (AutoModel) of a sentence-transformers folder in float32, with `.sentence`
    (read_sentence_folder's dict) and `.sentence_dense` attached; a one-line StudentError if it
    cannot be one. Trainable: the caller freezes a teacher."""
    from transformers import AutoModel
    spec = read_sentence_folder(folder, flag)
    if not os.path.isfile(os.path.join(spec["transformer"], "config.json")):
        raise StudentError(f"{flag} {folder}: no config.json in its Transformer folder {spec['transformer']}")
    try:
        model, info = AutoModel.from_pretrained(spec["transformer"], dtype=torch.float32, output_loading_info=True)
    except Exception as e:
        raise StudentError(f"{flag} {folder}: cannot load its transformer ({str(e).strip().splitlines()[0]})") from None
    lost = [k for k in info["missing_keys"] if "pooler" not in k]  # (the pooler: unused by sentence embeddings)
    if lost:
        raise StudentError(f"{flag} {folder} lacks trained weights for {', '.join(lost[:3])}; transformers would start "
                           "them at random: pass the folder sentence-transformers saved")
    if getattr(model, "get_input_embeddings", None) is None or not hasattr(model.config, "num_hidden_layers"):
        raise StudentError(f"{flag} {folder}: its transformer ({type(model).__name__}) is not a BERT-family encoder")
    if spec["do_lower_case"]:
        raise StudentError(f"{flag} {folder}: sentence_bert_config.json sets do_lower_case, which this project does "
                           "not apply to the texts; use a tokenizer that lowercases (e.g. an uncased WordPiece)")
    model.sentence = {k: v for k, v in spec.items() if k != "dense"}  # (transformer: where its tokenizer is)
    model.sentence_dense = nn.ModuleList(load_dense(c, w) for c, w in spec["dense"])
    return model


def load_embedding_teacher(folder):
    """A sentence-transformers folder as a teacher: frozen, in eval mode (pretrained.load_teacher's
    branch for folders that hold modules.json)."""
    return load_sentence_model(folder).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# 2. Sentence embeddings: pooling, the Dense modules, normalisation
# ---------------------------------------------------------------------------------------------

def pool(hidden, attention_mask, mode):
    """(B, L, D) token embeddings and (B, L) attention mask (None: every position real) -> (B, D),
    as sentence-transformers' Pooling computes it: "mean" over the real tokens (sums in float32),
    "mean_sqrt_len_tokens" the sum over sqrt(count), "max" over the real tokens, "cls" the first."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask if attention_mask is not None else hidden.new_ones(hidden.shape[:2])
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    total = (hidden * mask).sum(dim=1, dtype=torch.float32)
    count = mask.sum(dim=1, dtype=torch.float32).clamp(min=1e-9)
    return (total / (count if mode == "mean" else count.sqrt())).to(hidden.dtype)


def embed(model, input_ids, attention_mask, output_hidden_states=False):
    """(sentence embeddings (B, D'), the hidden states or None) of a model load_sentence_model made
    (or a student of it; `model` may be wrapped in DDP). attention_mask None: nothing padded."""
    inner = unwrap(model)
    # the 4-D mask ready-made: given the 2-D one, transformers reads it back to check it (distil.prepared_mask)
    out = model(input_ids=input_ids, attention_mask=prepared_mask(model, attention_mask),
                output_hidden_states=output_hidden_states)
    x = pool(out.last_hidden_state, attention_mask, inner.sentence["pooling"])
    for dense in inner.sentence_dense:
        x = dense(x)
    if inner.sentence["normalize"]:
        x = F.normalize(x.float(), dim=-1)
    return x, out.hidden_states


# ---------------------------------------------------------------------------------------------
# 3. The student
# ---------------------------------------------------------------------------------------------

def build_embedding_student(teacher, args, compares_hidden_states):
    """The teacher's layers (`--layers`, default an evenly spread half), narrower with
    --student-hidden, or `--student FOLDER` (a sentence-transformers folder, or a Hugging Face
    encoder given the teacher's modules), with the teacher's pooling, Dense modules, normalisation,
    max_seq_length, prompts and similarity function. A student whose embedding width differs from
    the teacher's gets a Dense module (width -> teacher's, [I; 0] at the start) before the others."""
    layers = None
    if args.layers is not None:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise StudentError(f"--layers {args.layers}: give teacher layer numbers separated by commas, e.g. 0,2,4")
    if args.student_arch != "teacher":
        raise StudentError("--student-arch distilbert converts masked LMs only; drop it for a sentence-embedding teacher")
    if args.student:
        if is_sentence_folder(args.student):
            student = load_sentence_model(args.student, "--student")
        else:
            from transformers import AutoModel
            try:
                student = AutoModel.from_pretrained(args.student, dtype=torch.float32)
            except Exception as e:
                raise StudentError(f"--student {args.student}: cannot load it ({str(e).strip().splitlines()[0]}); pass "
                                   "a sentence-transformers folder or a Hugging Face encoder folder") from None
            student.sentence = dict(teacher.sentence)
            student.sentence_dense = nn.ModuleList()
        if layers is not None:
            from student import make_student
            student = make_student(student, check_layers(layers, student.config.num_hidden_layers))
        layers = list(range(student.config.num_hidden_layers))
    else:
        layers = check_layers(layers if layers is not None else default_layers(teacher.config.num_hidden_layers),
                              teacher.config.num_hidden_layers)
        # built from the transformer alone (student.py checks the student against a model of its config),
        # then given copies of the teacher's modules
        dense = teacher.sentence_dense
        del teacher.sentence_dense
        try:
            student = build_student(teacher, layers, args.student_init, "teacher", args.student_hidden,
                                    args.student_heads, compares_hidden_states=compares_hidden_states)
        finally:
            teacher.sentence_dense = dense
        student.sentence = dict(teacher.sentence)
        student.sentence_dense = nn.ModuleList(_copy_module(d) for d in dense)
    width = lambda m: m.sentence_dense[-1][0].out_features if len(m.sentence_dense) else m.config.hidden_size
    if width(student) != width(teacher):
        if len(student.sentence_dense):
            raise StudentError(f"--student {args.student}: its embeddings have {width(student)} dimensions and the "
                               f"teacher's {width(teacher)}; start from a student of the teacher's width")
        projection = dense_module(student.config.hidden_size, width(teacher))
        with torch.no_grad():
            projection[0].weight.copy_(torch.eye(width(teacher), student.config.hidden_size))
            projection[0].bias.zero_()
        student.sentence_dense = nn.ModuleList([projection] + [_copy_module(d) for d in teacher.sentence_dense])
    student.sentence_dense.to(student.device)
    return student.train().requires_grad_(True), layers


def _copy_module(module):
    import copy
    return copy.deepcopy(module).requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# 4. Data: one text per sequence, truncated and counted, batched by length
# ---------------------------------------------------------------------------------------------

def first_pieces(corpus, seq_len):
    """One sequence per document (data.make_sequences' unpacked sequences, each document's first
    piece): the document truncated to seq_len tokens, [CLS] and [SEP] included. Returns
    (data.Sequences, texts truncated, tokens dropped)."""
    seqs = make_sequences(corpus, seq_len, pack=False)
    first = np.isin(seqs.starts, corpus.doc_starts[:-1])
    doc_len = np.diff(corpus.doc_starts) - 1
    over = doc_len > seq_len - 2
    seqs.starts, seqs.lengths = seqs.starts[first], seqs.lengths[first]
    return seqs, int(over.sum()), int((doc_len[over] - (seq_len - 2)).sum())


def embedding_batch(seqs, indices, tokenizer, max_length=None):
    """One batch as numpy arrays: input_ids and attention_mask (B, L), padded to the longest text,
    and where the layer losses read it (distil.batch_rows: real_rows, padded, n_real). `max_length`
    (a compiled step): the length is data.static_length's, real_rows padded to B * L (real_weight)."""
    input_ids, attention_mask = collate(seqs, indices, tokenizer, max_length)
    rows = batch_rows(attention_mask, np.full_like(attention_mask, -100), None if max_length is None else 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            **{k: rows[k] for k in ("real_rows", "padded", "n_real", "real_weight") if k in rows}}


def step_batches(seqs, batch_size, grad_accum, seed, epoch, rank=0, world_size=1):
    """The micro-batches (sequence-index arrays) of one rank for one epoch, grouped by length so that
    little padding is computed, and the same global batches whatever their split over ranks and
    micro-steps: the epoch's order (a permutation seeded by (seed, epoch)) is cut into optimizer
    steps of batch_size * grad_accum * world_size texts, sorted by length within groups of 50 steps;
    the steps are shuffled; micro-step a of rank r takes every world_size-th text from r of the
    step's a-th slice. (data.epoch_batches sorts each rank's share instead, so its global batches
    depend on the number of ranks.)"""
    step = batch_size * grad_accum * world_size
    order = np.random.default_rng([seed, epoch]).permutation(len(seqs.starts))
    n_steps = len(order) // step
    order = order[:n_steps * step]
    group = 50 * step
    order = np.concatenate([g[np.argsort(seqs.lengths[g], kind="stable")]
                            for g in np.split(order, range(group, len(order), group))]) if n_steps else order
    steps = order.reshape(n_steps, grad_accum, batch_size * world_size)
    steps = steps[np.random.default_rng([seed, epoch, 1]).permutation(n_steps)]
    return list(steps[:, :, rank::world_size].reshape(n_steps * grad_accum, batch_size))


class EmbeddingBatches(torch.utils.data.Dataset):
    """Micro-batch m of one rank's run, a pure function of m (step_batches' order), collated
    (embedding_batch), for data.micro_batch_loader."""

    def __init__(self, seqs, tokenizer, batch_size, grad_accum, seed, n_batches, rank=0, world_size=1,
                 max_length=None):
        self.seqs, self.tokenizer, self.batch_size, self.grad_accum, self.seed = seqs, tokenizer, batch_size, \
            grad_accum, seed
        self.max_length = max_length  # static shapes for a compiled step (embedding_batch)
        self.n_batches, self.rank, self.world_size = n_batches, rank, world_size
        self._epoch = self._batches = None

    def __getitem__(self, m):
        epoch, i = divmod(m, self.n_batches)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, step_batches(self.seqs, self.batch_size, self.grad_accum, self.seed,
                                                             epoch, self.rank, self.world_size)
        return embedding_batch(self.seqs, self._batches[i], self.tokenizer, self.max_length)


def read_heldout(path, text_column, label_column, tokenizer, seq_len):
    """Held-out texts (and their labels, when `path` is a .csv, .jsonl or dataset with `label_column`):
    a namespace of ids (lists of token ids, truncated to seq_len), labels (an int64 array of class
    ids, or None) and label_names. Empty texts are skipped."""
    labels = None
    if not path.lower().endswith(".txt"):
        try:
            records = [(r[text_column], r.get(label_column)) for _, r in read_records(path, [text_column, label_column])]
        except DataError as e:
            if f"'{label_column}'" not in str(e):
                raise
            records = None  # no label column: texts alone
        if records is not None:
            records = [(t, y) for t, y in records if isinstance(t, str) and t.strip()]
            texts = [t for t, _ in records]
            if all(y is not None and str(y).strip() != "" for _, y in records):
                labels = [str(y) for _, y in records]
    if labels is None:
        texts = [t for t, _ in read_documents(path, text_column)]
    if not texts:
        raise DataError(f"{path}: no texts to evaluate on; pass a --valid file with texts in --text-column")
    ids = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    names = sorted(set(labels)) if labels is not None else None
    label_ids = np.array([names.index(y) for y in labels], dtype=np.int64) if labels is not None else None
    if names is not None and len(names) < 2:
        names = label_ids = None  # one class: nothing to probe
    return SimpleNamespace(ids=ids, labels=label_ids, label_names=names, path=path)


# ---------------------------------------------------------------------------------------------
# 5. The step
# ---------------------------------------------------------------------------------------------

def count_embedding_rows(batch, cfg=None):
    """Rows each loss reads in `batch` (host ints): one sentence embedding per text ("embed"), and
    the real positions for the layer losses ("cos")."""
    return {"embed": len(batch["input_ids"]), "cos": batch.get("n_real", len(batch["real_rows"]))}


def embedding_step(student, teacher, batch, cfg, denominators=None):
    """Losses of one (micro-)batch of texts. Returns (weighted total, {term name: detached value}).

        loss = alpha_embed * EMBED + the layer losses of distil.layer_terms (cos, hidden, attn, relation)

    EMBED: losses.embedding_loss of the student's and the teacher's sentence embeddings (`embed`),
    cfg.embed_loss "mse" (sentence-transformers' MSELoss) or "cos". The layer losses read the real
    positions, as in a masked-LM run. `batch`: input_ids and attention_mask (B, L) int64 on the
    models' device, real_rows (flat int64 indices) and padded (bool), as embedding_batch builds them;
    `denominators` maps "embed" and "cos" to row counts summed over micro-steps and ranks (None: this
    batch's own). Nothing is read back from the device.
    """
    denominators = denominators or count_embedding_rows(batch)
    attention_mask = batch["attention_mask"] if batch["padded"] else None
    real_rows = batch["real_rows"] if batch["padded"] else None
    real_weight = batch.get("real_weight") if batch["padded"] else None  # a compiled step's padding rows: 0
    prepare_layer_losses(student, teacher, cfg)
    hidden = cfg.needs_hidden_states()
    with torch.no_grad():
        teacher_embedding, teacher_hidden = embed(teacher, batch["input_ids"], attention_mask, hidden)
    student_embedding, student_hidden = embed(student, batch["input_ids"], attention_mask, hidden)
    terms = {}
    if cfg.alpha_embed > 0:
        terms["embed"] = embedding_loss(student_embedding, teacher_embedding, denominators["embed"], cfg.embed_loss)
    terms.update(layer_terms(student, teacher, student_hidden, teacher_hidden, attention_mask, real_rows,
                             denominators["cos"], cfg, real_weight))
    return weighted(terms, cfg)


def embedding_probe_batch(student, length=8):
    """A batch of one text, no padding, on the student's device (distil.freeze_unreached's probe)."""
    device = next(student.parameters()).device
    input_ids = (torch.arange(length, device=device) % unwrap(student).get_input_embeddings().num_embeddings)[None]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "real_rows": torch.arange(length, device=device), "padded": False}


# ---------------------------------------------------------------------------------------------
# 6. Evaluation without labels (and a linear probe with them)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def encode(model, ids, pad_id, batch_size, device, autocast):
    """(N, D) float32 CPU embeddings of the token-id lists `ids`, in their order (batches of similar
    lengths), and the seconds the pass took (after one untimed warm-up batch; the device
    synchronised at the end)."""
    was_training = unwrap(model).training
    model.eval()
    order = np.argsort([len(x) for x in ids], kind="stable")
    chunks = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]

    def run(chunk):
        input_ids = torch.full((len(chunk), max(len(ids[i]) for i in chunk)), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, :len(ids[i])], mask[row, :len(ids[i])] = torch.tensor(ids[i]), 1
        with autocast():
            return embed(model, input_ids.to(device), mask.to(device))[0]

    run(chunks[-1])  # warm-up (the longest texts): allocations and kernel choices out of the timing
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    vectors = torch.cat([run(chunk) for chunk in chunks]).float().cpu()  # (the copy waits for the device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    result = torch.empty_like(vectors)
    result[torch.as_tensor(order)] = vectors
    return result, seconds


def _ranks(x):
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    return ranks  # (ties broken by order: pairwise cosines of real texts are almost never tied)


def agreement(student_embeddings, teacher_embeddings, k=10, max_texts=2000):
    """How far the student's embeddings reproduce the teacher's: (N, D) float32 each.

        cosine:      mean over texts of cos(student_i, teacher_i)
        spearman:    Spearman correlation of the pairwise cosine similarities (i < j) of the two
        top10_overlap: mean over texts of |student's k nearest ∩ teacher's k nearest| / k (the
                     text itself excluded): how often the student retrieves what the teacher does
    The pairwise scores read the first `max_texts` texts (their N² similarities)."""
    s, t = F.normalize(student_embeddings.double(), dim=-1), F.normalize(teacher_embeddings.double(), dim=-1)
    scores = {"cosine": (s * t).sum(-1).mean().item()}
    s, t = s[:max_texts], t[:max_texts]
    n = len(s)
    sim_s, sim_t = s @ s.T, t @ t.T
    upper = torch.triu_indices(n, n, offset=1)
    a, b = _ranks(sim_s[upper[0], upper[1]]), _ranks(sim_t[upper[0], upper[1]])
    a, b = a - a.mean(), b - b.mean()
    scores["spearman"] = (a @ b / (a.norm() * b.norm())).item() if n > 2 else float("nan")
    k = min(k, n - 1)
    if k >= 1:
        eye = torch.eye(n, dtype=torch.bool)
        near_s = sim_s.masked_fill(eye, -2).topk(k, dim=1).indices
        near_t = sim_t.masked_fill(eye, -2).topk(k, dim=1).indices
        hits = (near_s[:, :, None] == near_t[:, None, :]).any(-1).sum(1)
        scores["top10_overlap"] = hits.double().mean().item() / k
    return scores


def probe_accuracy(embeddings, labels, folds=5, seed=0):
    """A linear probe's accuracy: logistic regression (L2, C = 1, as scikit-learn's default) on the
    standardised embeddings, `folds`-fold cross-validated over the labelled held-out texts (folds
    drawn by `seed`), full-batch L-BFGS in float64. embeddings (N, D), labels (N,) int64 class ids."""
    x = embeddings.double()
    y = torch.as_tensor(labels)
    n, n_classes = len(y), int(y.max()) + 1
    fold = torch.as_tensor(np.random.default_rng(seed).permutation(n) % folds)
    correct = 0
    for f in range(folds):
        train, test = fold != f, fold == f
        mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-8)
        xt, xs = (x[train] - mean) / std, (x[test] - mean) / std
        w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(xt @ w + bias, y[train], reduction="sum") + 0.5 * (w * w).sum()
            loss.backward()
            return loss
        optimizer.step(closure)
        with torch.no_grad():
            correct += ((xs @ w + bias).argmax(1) == y[test]).sum().item()
    return correct / n


def evaluate_embeddings(model, held, pad_id, batch_size, device, autocast, teacher_result=None):
    """Scores of `model` on held-out texts `held` (read_heldout). Returns (scores, (embeddings,
    seconds)); with teacher_result (the teacher's own (embeddings, seconds)), the agreement with
    it and the encoding speed-up. Every rank computes the same scores over the whole held-out set
    (a few thousand texts: no collectives to keep in step)."""
    embeddings, seconds = encode(model, held.ids, pad_id, batch_size, device, autocast)
    scores = {"examples": len(held.ids), "encode_s": seconds}
    if teacher_result is not None:
        scores.update(agreement(embeddings, teacher_result[0]))
        scores["speedup"] = teacher_result[1] / max(seconds, 1e-9)
    if held.labels is not None:
        scores["probe_accuracy"] = probe_accuracy(embeddings, held.labels)
    return scores, (embeddings, seconds)


# ---------------------------------------------------------------------------------------------
# 7. Saving the student as a sentence-transformers folder
# ---------------------------------------------------------------------------------------------

def write_sentence_folder(model, tokenizer, folder):
    """Write `model` (a base model with .sentence and .sentence_dense) as sentence-transformers
    saves one, in the classic layout every version reads: the Hugging Face model and tokenizer at
    the top (AutoModel loads them), modules.json, sentence_bert_config.json (max_seq_length),
    config_sentence_transformers.json (prompts, default prompt, similarity function: the teacher's;
    cosine when it named none, sentence-transformers' default), 1_Pooling/config.json, a folder per
    Dense module (config.json, model.safetensors) and Normalize."""
    from safetensors.torch import save_file
    import transformers
    spec = model.sentence
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith(("sentence_dense.", "distil_projection."))}
    model.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    width = model.config.hidden_size
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    pooling = {"word_embedding_dimension": width, **{k: spec["pooling"] == mode for k, mode in LEGACY_POOLING.items()},
               "include_prompt": spec.get("include_prompt", True)}
    _write_json(os.path.join(folder, "1_Pooling", "config.json"), pooling)
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    for dense in model.sentence_dense:
        i = len(modules)
        path = f"{i}_Dense"
        os.makedirs(os.path.join(folder, path), exist_ok=True)
        linear = dense[0]
        _write_json(os.path.join(folder, path, "config.json"),
                    {"in_features": linear.in_features, "out_features": linear.out_features,
                     "bias": linear.bias is not None, "activation_function": dense.activation_name})
        save_file({f"linear.{k}": v.detach().float().cpu().contiguous() for k, v in linear.state_dict().items()},
                  os.path.join(folder, path, "model.safetensors"))
        modules.append({"idx": i, "name": str(i), "path": path, "type": "sentence_transformers.models.Dense"})
    if spec["normalize"]:
        i = len(modules)
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Normalize", "type": "sentence_transformers.models.Normalize"})
    _write_json(os.path.join(folder, "modules.json"), modules)
    _write_json(os.path.join(folder, "sentence_bert_config.json"),
                {"max_seq_length": spec["max_seq_length"] or 512, "do_lower_case": False})
    st = {"__version__": {"pytorch": torch.__version__, "transformers": transformers.__version__},
          "prompts": spec["st_config"].get("prompts", {}), "default_prompt_name": spec["st_config"].get("default_prompt_name"),
          "similarity_fn_name": spec["st_config"].get("similarity_fn_name") or "cosine"}
    _write_json(os.path.join(folder, "config_sentence_transformers.json"), st)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def save_embedding_student(student, tokenizer, out_dir):
    """The student as a sentence-transformers folder in `out_dir`, checked on reload: written to
    OUT/.saving, read back (load_sentence_model) and its embeddings compared with the student's,
    then moved in with modules.json last (a crash never leaves a folder that looks finished)."""
    import shutil
    tmp = os.path.join(out_dir, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_sentence_folder(student, tokenizer, tmp)
    check_sentence_reload(student, tokenizer, tmp)
    for name in sorted(os.listdir(tmp), key=lambda name: name == "modules.json"):
        target = os.path.join(out_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


def check_sentence_reload(student, tokenizer, folder, atol=1e-4):
    """Raise a StudentError unless the folder, read back, embeds two texts as the student does."""
    ids = tokenizer(["The cat sat on the mat.", "A bird flew over the house, near the river."], padding=True,
                    return_tensors="pt")
    device = student.device
    reloaded = load_sentence_model(folder, "the saved student").to(device).eval()
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            expected, _ = embed(student, ids["input_ids"].to(device), ids["attention_mask"].to(device))
            got, _ = embed(reloaded, ids["input_ids"].to(device), ids["attention_mask"].to(device))
    finally:
        student.train(was_training)
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    if not diff <= atol * max(1.0, expected.abs().max().item()):
        raise StudentError(f"the saved student does not reload as trained (embeddings {diff:.3g} apart); the files "
                           f"stay in {folder} and the trained weights in the run's checkpoints")


# ---------------------------------------------------------------------------------------------
# 8. The run: train.py's inputs and pick_run's namespace for a sentence-embedding teacher
# ---------------------------------------------------------------------------------------------

def load_embedding_inputs(args, global_batch, master, teacher):
    """run_inputs.load_inputs for a sentence-embedding teacher: the same namespace (tokenizer, layers,
    cfg, student, train_data: data.Sequences of one text each, valid_data: read_heldout's texts,
    spec None, seq_len, steps_per_epoch, train_corpus), every problem a one-line error."""
    from pretrained import check_student_vocabulary, load_tokenizer, usable_positions
    from run_inputs import recipe_config  # (run_inputs imports this module only inside a function)

    tokenizer = load_tokenizer(teacher, teacher.sentence["transformer"], args.tokenizer, masked_lm=False)
    max_len = usable_positions(teacher)
    seq_len = args.seq_len if args.seq_len is not None else min(128, teacher.sentence["max_seq_length"] or max_len,
                                                                 max_len)
    if seq_len > max_len:
        raise DataError(f"--seq-len {seq_len} is longer than the teacher's {max_len} positions; "
                        f"use --seq-len {max_len} or less")
    student, layers = build_embedding_student(teacher, args, args.alpha_cos > 0 or args.alpha_hidden > 0)
    if args.student:
        check_student_vocabulary(tokenizer, student.sentence.get("transformer", args.student))
        if len(tokenizer) > student.get_input_embeddings().num_embeddings:
            raise StudentError(f"--student {args.student}: its embeddings have fewer rows than the teacher's "
                               "tokenizer has tokens; start from a checkpoint of the teacher's tokenizer")
    cfg = recipe_config(args, layers, teacher.config.num_hidden_layers, teacher)
    corpus = load_corpus(args.train, tokenizer, args.cache_dir, args.text_column, args.min_tokens,
                         progress=master and args.progress)
    train_data, n_truncated, n_dropped = first_pieces(corpus, seq_len)
    valid_data = read_heldout(args.valid, args.text_column, args.label_column, tokenizer, seq_len) if args.valid \
        else None
    if master:
        for note in (corpus_note(corpus),):
            if note:
                print(note)
        print(f"{os.path.basename(args.train)}: {len(train_data.starts)} texts, one per sequence"
              + (f"; {n_truncated} longer than --seq-len {seq_len} truncated ({n_dropped} tokens dropped)"
                 if n_truncated else ""))
        if valid_data is not None:
            print(f"{os.path.basename(args.valid)}: {len(valid_data.ids)} held-out texts"
                  + (f", {len(valid_data.label_names)} labels ({', '.join(valid_data.label_names[:5])}"
                     f"{', ...' if len(valid_data.label_names) > 5 else ''}): a linear probe scores them"
                     if valid_data.labels is not None else ", no labels"))
    steps_per_epoch = len(train_data.starts) // global_batch
    if steps_per_epoch < 1:
        raise DataError(f"{args.train} gives {len(train_data.starts)} texts: too few for one step of {global_batch}; "
                        "lower --batch-size or --grad-accum, or pass more texts")
    train_corpus = {"tokens": int(train_data.lengths.sum()), "sequences": len(train_data.starts),
                    "sha256": corpus_digest(corpus), "cache": corpus.cache_name}
    return SimpleNamespace(tokenizer=tokenizer, layers=layers, cfg=cfg, student=student, train_data=train_data,
                           valid_data=valid_data, spec=None, seq_len=seq_len, steps_per_epoch=steps_per_epoch,
                           train_corpus=train_corpus)


def embedding_run(args, inputs, teacher, n_batches, rank, world_size, device, autocast):
    """train.pick_run's namespace for a sentence-embedding teacher (see pick_run for the fields)."""
    tokenizer, valid = inputs.tokenizer, inputs.valid_data

    def evaluate(model, teacher_predictions=None):
        return evaluate_embeddings(model, valid, tokenizer.pad_token_id, args.batch_size, device, autocast,
                                   teacher_predictions)

    def write_card(config, step, valid_scores, teacher_scores):
        write_embedding_card(args.out, config, teacher, unwrap(inputs.student), inputs.layers, step,
                             len(inputs.train_data.starts), valid_scores, teacher_scores)
    return SimpleNamespace(
        step=embedding_step, count=count_embedding_rows, probe_batch=embedding_probe_batch,
        dataset=EmbeddingBatches(inputs.train_data, tokenizer, args.batch_size, args.grad_accum, args.seed, n_batches,
                                 rank, world_size, inputs.seq_len if args.compile else None),
        evaluate=evaluate, write_card=write_card, save=save_embedding_student)


SCORE_NAMES = {"spearman": "Spearman correlation of pairwise similarities with the teacher's",
               "top10_overlap": "top-10 neighbour overlap with the teacher", "cosine": "mean cosine to the teacher's "
               "embedding", "probe_accuracy": "linear-probe accuracy (5-fold)", "speedup": "encoding speed-up"}


def embedding_card(run, teacher, student, layers, steps, n_texts, scores, teacher_scores):
    """The text of README.md for a distilled sentence-embedding model (Hub header: pipeline
    sentence-similarity, library sentence-transformers)."""
    from huggingface_hub import ModelCardData
    from modelcard import _is_hub_name, _source_name, teacher_card_metadata
    known = teacher_card_metadata(run["teacher"])
    header = ModelCardData(library_name="sentence-transformers", pipeline_tag="sentence-similarity",
                           license=known.get("license"), language=run.get("language") or known.get("language"),
                           base_model=run["teacher"] if _is_hub_name(run["teacher"]) else None,
                           tags=["sentence-transformers", "feature-extraction", "distillation"])
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    rows = ""
    for key, name in SCORE_NAMES.items():
        if scores and key in scores:
            fmt = (lambda v: f"{v:.2f}x") if key == "speedup" else (lambda v: f"{v:.4f}")
            t = teacher_scores.get(key) if teacher_scores else None
            rows += f"| {name} | {'' if t is None else fmt(t)} | {fmt(scores[key])} |\n"
    table = (f"\nOn {scores['examples']} held-out texts ({_source_name(run['valid'])}):\n\n| | teacher | student |\n"
             f"|---|---|---|\n{rows}") if scores else ""
    spec = student.sentence
    body = f"""
# Sentence embeddings distilled from {_source_name(run['teacher'])}

A {student.config.num_hidden_layers}-layer student ({n_params(student) / 1e6:.1f}M parameters) of the
{teacher.config.num_hidden_layers}-layer sentence-embedding model {_source_name(run['teacher'])}
({n_params(teacher) / 1e6:.1f}M), made of the teacher's layers {', '.join(map(str, layers))} (0-based) and trained
for {steps} steps of {run['global_batch']} texts to reproduce the teacher's sentence embeddings
({run['embed_loss']} loss, weight {run['alpha_embed']}) on {n_texts} texts of {_source_name(run['train'])}
(truncated to {run['seq_len_used']} tokens). Pooling: {spec['pooling']}{', then normalised' if spec['normalize'] else ''};
max_seq_length {spec['max_seq_length']}; similarity: {spec['st_config'].get('similarity_fn_name') or 'cosine'}.
{table}
## How to use

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{_source_name(run['out'])}")
embeddings = model.encode(["A sentence to embed.", "Another one."])
```
"""
    return f"---\n{header.to_yaml()}\n---\n{body}"


def write_embedding_card(out_dir, run, teacher, student, layers, steps, n_texts, scores, teacher_scores):
    """Write OUT/README.md for a sentence-embedding run (embedding_card); returns its path."""
    path = os.path.join(out_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(embedding_card(run, teacher, student, layers, steps, n_texts, scores, teacher_scores))
    return path


# ---------------------------------------------------------------------------------------------
# 9. heldout.py for sentence-embedding models
# ---------------------------------------------------------------------------------------------

def evaluate_folder(args, device, autocast):
    """heldout.py's table for a sentence-embedding student: STUDENT (a folder train.py saved), or the
    teacher's --layers with nothing trained (the starting point of a run), scored against --teacher
    on --valid (agreement, encoding speed-up, a linear probe when the texts have labels)."""
    from pretrained import load_tokenizer, usable_positions
    if not args.teacher or not is_sentence_folder(args.teacher):
        raise StudentError("pass --teacher: the sentence-transformers folder the student is scored against")
    teacher = load_embedding_teacher(args.teacher).to(device)
    if args.student:
        student = load_sentence_model(args.student, "STUDENT")
    elif args.layers:
        student, _ = build_embedding_student(teacher, SimpleNamespace(
            layers=args.layers, student=None, student_arch="teacher", student_init="teacher", student_hidden=None,
            student_heads=None), False)
    else:
        raise StudentError("pass STUDENT (a folder train.py wrote) or --layers (the teacher's layers, untrained)")
    student = student.to(device).eval()
    tokenizer = load_tokenizer(teacher, teacher.sentence["transformer"], masked_lm=False)
    seq_len = min(args.seq_len, usable_positions(teacher))
    held = read_heldout(args.valid, args.text_column or "text", args.label_column or "label", tokenizer, seq_len)
    teacher_scores, teacher_result = evaluate_embeddings(teacher, held, tokenizer.pad_token_id, args.batch_size,
                                                         device, autocast)
    scores, _ = evaluate_embeddings(student, held, tokenizer.pad_token_id, args.batch_size, device, autocast,
                                    teacher_result)
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    result = {"kind": KIND, "student": scores, "teacher": teacher_scores, "student_params": n_params(student),
              "teacher_params": n_params(teacher), "student_layers": student.config.num_hidden_layers,
              "device": str(device), "dtype": args.dtype}
    if args.json:
        print(json.dumps(result))
        return result
    print("| | teacher | student |\n|---|---|---|")
    for key, name in SCORE_NAMES.items():
        if key in scores:
            t = teacher_scores.get(key)
            fmt = (lambda v: f"{v:.2f}x") if key == "speedup" else (lambda v: f"{v:.4f}")
            print(f"| {name} | {'' if t is None else fmt(t)} | {fmt(scores[key])} |")
    print(f"| parameters | {result['teacher_params'] / 1e6:.1f}M | {result['student_params'] / 1e6:.1f}M |\n"
          f"| encoding {scores['examples']} texts ({device}, {args.dtype}) | {teacher_scores['encode_s']:.2f} s | "
          f"{scores['encode_s']:.2f} s |")
    return result
