"""Plot a run: the loss terms and the validation perplexity from OUT/metrics.jsonl into OUT/metrics.png.

    python -m tools.plot runs/distil            # writes runs/distil/metrics.png
    python -m tools.plot runs/a runs/b -o cmp.png   # several runs on the same axes

Needs matplotlib (pip install matplotlib); nothing else in the project does.
"""

import argparse
import json
import os

# The loss terms train.py can log, for a run folder without run.json.
KNOWN_TERMS = ("kd", "mlm", "cos", "mse", "hidden", "attn", "relation")


def read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such file; pass the --out folder of a train.py run")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records, name):
    """(steps, values) of every record that has `name`."""
    points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def read_run(out_dir):
    """The run's settings (OUT/run.json), or None when the folder has none."""
    path = os.path.join(out_dir, "run.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def loss_terms(records, run=None):
    """The loss terms a run logged: "loss" (their weighted sum), then each key of the training
    records that is weighted by an --alpha-KEY in the run's settings, in the order logged. So every
    term that was on is drawn, a new one included, and no rate or count (lr, tokens_per_s, ...)
    is. Without the settings, the terms train.py knows (KNOWN_TERMS)."""
    weighted = KNOWN_TERMS if run is None else {k[len("alpha_"):] for k in run if k.startswith("alpha_")}
    names = []
    for record in records:
        if "loss" in record:
            names += [k for k, v in record.items() if k in weighted and k not in names and isinstance(v, (int, float))]
    return (["loss"] if any("loss" in r for r in records) else []) + names


def figure(out_dirs):
    """The matplotlib figure of one or more runs: loss terms (left), perplexities (right)."""
    runs = {out_dir: read_metrics(out_dir) for out_dir in out_dirs}  # a wrong folder first: the likelier mistake
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed on a GPU node
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for out_dir in out_dirs:
        records = runs[out_dir]
        prefix = f"{os.path.basename(os.path.normpath(out_dir))}: " if len(out_dirs) > 1 else ""
        for name in loss_terms(records, read_run(out_dir)):
            steps, values = series(records, name)
            if steps:
                ax_loss.plot(steps, values, label=prefix + name, lw=2 if name == "loss" else 1)
        steps, values = series(records, "valid_ppl")
        if steps:
            ax_ppl.plot(steps, values, marker="o", label=prefix + "student")
        _, teacher = series(records, "teacher_ppl")
        if teacher:  # measured once, at the start: a level to approach
            ax_ppl.axhline(teacher[-1], ls="--", color="gray", label=prefix + "teacher")
    # The terms differ by orders of magnitude (KD starts large, cosine is below 1): log scale.
    ax_loss.set(xlabel="step", ylabel="training loss (per term)", yscale="log", title="loss terms")
    ax_ppl.set(xlabel="step", ylabel="masked-LM perplexity", yscale="log", title="validation perplexity")
    ax_ppl.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 65, not 6.5x10^1
    ax_ppl.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(out_dirs, png_path):
    """Draw the runs in `out_dirs` into `png_path` (1200 x 450 pixels); returns the path."""
    fig = figure(out_dirs)  # imports matplotlib, or says how to install it
    import matplotlib.pyplot as plt

    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="--out folder(s) of train.py runs")
    p.add_argument("-o", "--output", help="PNG to write (default: OUT_DIR/metrics.png of the first run)")
    args = p.parse_args(argv)
    png = plot(args.out_dirs, args.output or os.path.join(args.out_dirs[0], "metrics.png"))
    print(f"wrote {png}")
    return png


if __name__ == "__main__":
    main()
