"""Every numeric flag out of its range stops train.py in one line before anything is loaded.

The teacher named here does not exist: a flag check that ran after loading the teacher would
report the missing folder instead, so the message proves the order.
"""

import json
import os
import subprocess
import sys

import pytest

import train

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (flags, words the one-line error must contain); each case is one flag (or one combination) out of range
BAD_FLAGS = [
    (["--temperature", "0"], ["--temperature 0", "above 0"]),
    (["--temperature", "-1"], ["--temperature -1"]),
    (["--temperature", "nan"], ["--temperature nan", "finite"]),
    (["--mlm-prob", "0"], ["--mlm-prob 0", "(0, 1]"]),
    (["--mlm-prob", "1.5"], ["--mlm-prob 1.5", "(0, 1]"]),
    (["--mlm-smoothing", "-0.7"], ["--mlm-smoothing -0.7"]),
    (["--batch-size", "0"], ["--batch-size 0", "at least 1"]),
    (["--grad-accum", "0"], ["--grad-accum 0"]),
    (["--max-steps", "0"], ["--max-steps 0"]),
    (["--seq-len", "0"], ["--seq-len 0"]),
    (["--seq-len", "2"], ["--seq-len 2", "at least 3"]),
    (["--eval-every", "0"], ["--eval-every 0"]),
    (["--save-every", "-5"], ["--save-every -5"]),
    (["--log-every", "0"], ["--log-every 0"]),
    (["--max-bad-steps", "0"], ["--max-bad-steps 0"]),
    (["--epochs", "0"], ["--epochs 0", "above 0"]),
    (["--epochs", "inf"], ["--epochs inf", "finite"]),
    (["--lr", "0"], ["--lr 0"]),
    (["--lr=-1e-4"], ["--lr -0.0001"]),
    (["--warmup", "1"], ["--warmup 1", "[0, 1)"]),
    (["--warmup", "-0.1"], ["--warmup -0.1"]),
    (["--weight-decay", "-0.01"], ["--weight-decay -0.01"]),
    (["--adam-betas", "0.9"], ["--adam-betas 0.9", "two numbers"]),
    (["--adam-betas", "0.9,1.0"], ["--adam-betas 0.9,1.0", "[0, 1)"]),
    (["--adam-betas", "a,b"], ["--adam-betas a,b"]),
    (["--adam-eps", "0"], ["--adam-eps 0"]),
    (["--clip", "-1"], ["--clip -1"]),
    (["--alpha-kd", "-1"], ["--alpha-kd -1"]),
    (["--alpha-mlm", "-2"], ["--alpha-mlm -2"]),
    (["--alpha-cos", "-1"], ["--alpha-cos -1"]),
    (["--alpha-mse", "-1"], ["--alpha-mse -1"]),
    (["--alpha-hidden", "-1"], ["--alpha-hidden -1"]),
    (["--alpha-attn", "-1"], ["--alpha-attn -1"]),
    (["--alpha-relation", "-1"], ["--alpha-relation -1"]),
    (["--alpha-kd", "0", "--alpha-mlm", "0", "--alpha-cos", "0", "--alpha-label", "0"], ["every --alpha-* is 0"]),
    (["--keep", "-1"], ["--keep -1"]),
    (["--relation-heads", "-2"], ["--relation-heads -2"]),
    (["--min-tokens", "0"], ["--min-tokens 0"]),
    (["--student-hidden", "0"], ["--student-hidden 0"]),
    (["--student-heads", "0"], ["--student-heads 0"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--num-workers", "-1"], ["--num-workers -1"]),
    # attention losses read pairs of real layers: the embeddings (0) have no attention
    (["--alpha-attn", "1", "--layer-map", "0:0"], ["--alpha-attn", "--layer-map 0:0", "both above 0"]),
    (["--alpha-relation", "1", "--layer-map", "0:0,3:0"], ["--alpha-relation", "--layer-map 0:0,3:0"]),
]


def base_flags(tmp_path):
    return ["--teacher", str(tmp_path / "no-such-teacher"), "--train", str(tmp_path / "no-such.txt"),
            "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("flags,fragments", BAD_FLAGS, ids=[" ".join(c[0]) for c in BAD_FLAGS])
def test_bad_flag_stops_before_anything_is_loaded(flags, fragments, tmp_path):
    with pytest.raises(SystemExit) as info:
        train.main(base_flags(tmp_path) + flags)
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert "no-such-teacher" not in message and not (tmp_path / "out").exists()


@pytest.mark.parametrize("key,value", [("batch_size", 2.5), ("lr", True), ("temperature", 0), ("epochs", "many"),
                                       ("dtype", "bf32"), ("compile", "yes"), ("kd_on", "some")])
def test_bad_values_in_a_config_file(key, value, tmp_path):
    """JSON numbers reach the flags unconverted: their kind is checked as well as their range; a flag
    with choices gets one of them (argparse checks them on the command line only)."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({key: value}))
    with pytest.raises(SystemExit) as info:
        train.main(base_flags(tmp_path) + ["--config", str(config)])
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message and f"--{key.replace('_', '-')}" in message


def test_a_config_file_from_when_compile_was_a_switch_still_reads(tmp_path):
    from flags import parse_args
    for value, expected in ((True, "on"), (False, "off")):
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"compile": value}))
        assert parse_args(base_flags(tmp_path) + ["--config", str(config)]).compile == expected


def test_good_edge_values_pass(tmp_path):
    from flags import parse_args
    args = parse_args(base_flags(tmp_path) + [
        "--mlm-prob", "1", "--warmup", "0", "--clip", "0", "--keep", "0", "--alpha-kd", "0", "--alpha-cos", "0",
        "--weight-decay", "0", "--adam-betas", "0,0.999", "--relation-heads", "0", "--seq-len", "3",
        "--alpha-attn", "1", "--layer-map", "0:0,2:1", "--seed", "0"])
    assert (args.mlm_prob, args.warmup, args.alpha_attn) == (1.0, 0.0, 1.0)


def test_what_the_user_sees(tmp_path):
    """The real command line: exit status 1, one line on stderr, no traceback, nothing written."""
    cmd = [sys.executable, os.path.join(HERE, "train.py")] + base_flags(tmp_path) + ["--temperature", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: --temperature 0.0: must be above 0 (the recipe uses 2) (python train.py --help lists the flags)"]
    assert not (tmp_path / "out").exists()
