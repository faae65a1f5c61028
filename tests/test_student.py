"""The student builder: exact copies of the chosen teacher layers, a frozen untouched teacher, clear errors."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, RobertaConfig,
                          RobertaForMaskedLM)

from pretrained import load_teacher, load_tokenizer, save_student, usable_positions
from student import StudentError, check_layers, default_layers, encoder_layers, make_student


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(tiny_teacher)


@pytest.fixture(scope="module")
def input_ids(teacher):
    torch.manual_seed(0)
    ids = torch.randint(5, teacher.config.vocab_size, (3, 12))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    return ids


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_load_teacher_is_frozen_float32_eval(teacher):
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


def test_all_layers_reproduce_the_teacher(teacher, input_ids):
    n = teacher.config.num_hidden_layers
    student = make_student(teacher, list(range(n))).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids).logits, teacher(input_ids).logits, rtol=0, atol=1e-6)


def test_subset_copies_chosen_layers_in_order(teacher):
    layers = [3, 0, 2]  # out of order on purpose: the student's layer k is the teacher's layers[k]
    before = snapshot(teacher)
    student = make_student(teacher, layers)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(layers)
    student_layers, teacher_layers = encoder_layers(student), encoder_layers(teacher)
    assert len(student_layers) == len(layers)
    for k, i in enumerate(layers):
        s_params, t_params = dict(student_layers[k].named_parameters()), dict(teacher_layers[i].named_parameters())
        assert s_params.keys() == t_params.keys()
        for name in t_params:
            assert torch.equal(s_params[name], t_params[name]), f"student layer {k}.{name} != teacher layer {i}"
            assert s_params[name].data_ptr() != t_params[name].data_ptr(), "student shares memory with the teacher"
    # embeddings and the MLM head (transform included) are copied too
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    outside = [name for name in t_params if ".layer." not in name]
    assert any("embeddings" in name for name in outside) and any(name.startswith("cls.") for name in outside)
    for name in outside:
        assert torch.equal(s_params[name], t_params[name]), name
    # the decoder is still tied to the student's own word embeddings
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    # the student trains; the teacher is untouched, still frozen and in eval mode
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert teacher.config.num_hidden_layers == 4 and len(teacher_layers) == 4
    after = snapshot(teacher)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_training_the_student_leaves_the_teacher_alone(teacher, input_ids):
    before = snapshot(teacher)
    student = make_student(teacher, [0, 3])
    student(input_ids).logits.sum().backward()
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    assert not torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert all(torch.equal(before[name], p) for name, p in teacher.named_parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_default_layers():
    assert default_layers(12) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert default_layers(1) == [0] and default_layers(2) == [1] and default_layers(3) == [2]  # one layer: the last
    for n in (4, 5, 6, 7, 8, 10, 16, 24, 32, 48):
        layers = default_layers(n)
        assert len(layers) == n // 2, n
        assert layers == sorted(set(layers)) and layers[0] == 0 and layers[-1] == n - 1, (n, layers)
        gaps = {b - a for a, b in zip(layers, layers[1:])}
        assert max(gaps) - min(gaps) <= 1, (n, layers)  # evenly spread


def test_default_student_is_half_the_teacher(teacher):
    student = make_student(teacher)
    assert student.config.num_hidden_layers == 2 and len(encoder_layers(student)) == 2


@pytest.mark.parametrize("layers, words", [
    ([], "empty"),
    ([0, 4], "out of range"),
    ([-1, 2], "out of range"),
    ([0, 2, 2], "repeats"),
])
def test_bad_layer_lists(teacher, layers, words):
    with pytest.raises(StudentError) as info:
        make_student(teacher, layers)
    message = str(info.value)
    assert words in message and "--layers" in message and "\n" not in message
    if words == "out of range":
        assert "4 layers" in message  # says what would fit


def test_check_layers_accepts_a_good_list():
    assert check_layers((5, 1, 3), 6) == [5, 1, 3]


def test_random_init_has_same_shapes_and_new_weights(teacher):
    copied, fresh = make_student(teacher, [0, 3]), make_student(teacher, [0, 3], init="random")
    assert type(fresh) is type(teacher) and fresh.config.num_hidden_layers == 2
    copied_params, fresh_params = dict(copied.named_parameters()), dict(fresh.named_parameters())
    assert copied_params.keys() == fresh_params.keys()
    for name, p in fresh_params.items():
        assert p.shape == copied_params[name].shape, name
    matrices = [name for name, p in fresh_params.items() if p.dim() == 2]
    assert all(not torch.equal(fresh_params[name], copied_params[name]) for name in matrices)
    assert fresh.get_output_embeddings().weight is fresh.get_input_embeddings().weight
    with pytest.raises(StudentError, match="init="):
        make_student(teacher, [0], init="zeros")


def test_saved_subset_student_reloads_with_identical_logits(teacher, input_ids, tiny_teacher, tmp_path):
    student = make_student(teacher, [1, 3]).eval()
    out = str(tmp_path / "student")
    save_student(student, AutoTokenizer.from_pretrained(tiny_teacher), out)
    assert not os.path.exists(os.path.join(out, ".saving"))
    reloaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, student(input_ids).logits, rtol=0, atol=0)
    AutoTokenizer.from_pretrained(out)  # the tokenizer is saved beside it


def test_teacher_without_mlm_head_is_refused(tiny_teacher, tmp_path):
    folder = str(tmp_path / "base")
    BertModel(load_teacher(tiny_teacher).config).save_pretrained(folder)  # encoder only, no MLM head
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_teacher, name), folder)
    with pytest.raises(StudentError) as info:
        load_teacher(folder)
    message = str(info.value)
    assert "masked-LM head" in message and "missing cls.predictions" in message and "\n" not in message


def test_teacher_folder_missing_or_not_a_model(tmp_path):
    with pytest.raises(StudentError, match="no such folder"):
        load_teacher(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudentError, match="not a Hugging Face model folder"):
        load_teacher(str(tmp_path / "empty"))


def test_usable_positions():
    size = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert usable_positions(BertForMaskedLM(BertConfig(max_position_embeddings=40, **size))) == 40
    roberta = RobertaForMaskedLM(RobertaConfig(max_position_embeddings=42, pad_token_id=1, **size))
    assert usable_positions(roberta) == 42 - 1 - 1  # RoBERTa numbers positions from pad_token_id + 1


def test_works_from_structure_for_roberta():
    torch.manual_seed(0)
    teacher = RobertaForMaskedLM(RobertaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                               intermediate_size=32, max_position_embeddings=42, pad_token_id=1)).eval()
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(make_student(teacher, [0, 1, 2]).eval()(ids).logits, teacher(ids).logits,
                                   rtol=0, atol=1e-6)
    student = make_student(teacher, [2])
    assert type(student) is RobertaForMaskedLM and len(encoder_layers(student)) == 1
    assert torch.equal(encoder_layers(student)[0].output.dense.weight, encoder_layers(teacher)[2].output.dense.weight)


# ---- --tokenizer against the teacher's own, however the teacher's is stored (issue 12, item 5) ----

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json")


def keep_only(folder, names):
    """Delete the teacher folder's tokenizer files except `names`."""
    for name in TOKENIZER_FILES:
        if name not in names and os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    return folder


def swapped_bert_tokenizer(folder, source):
    """The teacher's vocabulary with 'cat' and 'dog' swapped: the same words, other ids."""
    from transformers import BertTokenizer
    os.makedirs(folder)
    vocab = open(os.path.join(source, "vocab.txt")).read().split("\n")
    i, j = vocab.index("cat"), vocab.index("dog")
    vocab[i], vocab[j] = vocab[j], vocab[i]
    open(os.path.join(folder, "vocab.txt"), "w").write("\n".join(vocab))
    BertTokenizer(vocab=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_tokenizers(tiny_teacher, tmp_path_factory):
    """(teacher folder holding tokenizer.json, vocab.txt only, no tokenizer at all; a tokenizer of swapped ids;
    a copy of the teacher's own tokenizer)."""
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for name, keep in (("full", TOKENIZER_FILES), ("vocab-txt", ("vocab.txt",)), ("none", ())):
        folders[name] = keep_only(shutil.copytree(tiny_teacher, root / name), keep)
    folders["swapped"] = swapped_bert_tokenizer(str(root / "swapped"), tiny_teacher)
    folders["same"] = keep_only(shutil.copytree(tiny_teacher, root / "same"), ("vocab.txt",))
    return {k: str(v) for k, v in folders.items()}


@pytest.mark.parametrize("stored", ["full", "vocab-txt"])
def test_tokenizer_of_other_ids_is_refused_however_the_teacher_stores_its_own(stored, teacher, bert_tokenizers):
    with pytest.raises(StudentError) as info:
        load_tokenizer(teacher, bert_tokenizers[stored], bert_tokenizers["swapped"])
    message = str(info.value)
    assert "its vocabulary differs from the teacher's own tokenizer" in message and "'cat' is id" in message
    assert "\n" not in message
    # the teacher's own vocabulary, in another file format, is accepted
    assert load_tokenizer(teacher, bert_tokenizers[stored], bert_tokenizers["same"]).get_vocab() == \
        AutoTokenizer.from_pretrained(bert_tokenizers["full"]).get_vocab()


def test_teacher_without_tokenizer_files(teacher, bert_tokenizers):
    """Nothing to compare with: --tokenizer is then the tokenizer; without it, the run is refused
    (transformers would build the class's tokenizer from nothing: the special tokens alone)."""
    assert load_tokenizer(teacher, bert_tokenizers["none"], bert_tokenizers["same"]) is not None
    with pytest.raises(StudentError, match="no tokenizer files there .*pass --tokenizer"):
        load_tokenizer(teacher, bert_tokenizers["none"])


def test_tokenizer_with_other_special_tokens_is_refused(teacher, bert_tokenizers, tmp_path):
    """Same vocabulary, another token named as the mask: the student would learn to fill a word."""
    from transformers import BertTokenizer
    folder = str(tmp_path / "other-mask")
    BertTokenizer(vocab=os.path.join(bert_tokenizers["full"], "vocab.txt"), mask_token="[UNK]",
                  unk_token="[MASK]").save_pretrained(folder)
    with pytest.raises(StudentError, match="its mask_token is '\\[UNK\\]' but the teacher's own tokenizer's is"):
        load_tokenizer(teacher, bert_tokenizers["full"], folder)


def test_byte_bpe_teacher_with_vocab_json_and_merges(tmp_path):
    """A RoBERTa teacher stored with vocab.json + merges.txt (no tokenizer.json)."""
    import json
    from test_families import ENGLISH, byte_bpe_tokenizer, roberta_style, sentences
    own = byte_bpe_tokenizer(sentences(ENGLISH, 400, seed=3))
    state = json.loads(own.backend_tokenizer.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    teacher = RobertaForMaskedLM(roberta_style(RobertaConfig, own))

    def folder(name, vocab):  # config.json tells AutoTokenizer the class; the two files hold the tokenizer
        path = tmp_path / name
        teacher.config.save_pretrained(path)
        (path / "vocab.json").write_text(json.dumps(vocab))
        (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return str(path)

    teacher_dir = folder("teacher", vocab)
    assert AutoTokenizer.from_pretrained(teacher_dir).get_vocab() == own.get_vocab()  # loads from the two files
    the, cat = own.convert_tokens_to_ids(["the", "Ġcat"])
    swapped = {token: {the: cat, cat: the}.get(i, i) for token, i in vocab.items()}
    other = folder("other", swapped)
    with pytest.raises(StudentError, match="its vocabulary differs from the teacher's own tokenizer"):
        load_tokenizer(teacher, teacher_dir, other)
    assert load_tokenizer(teacher, teacher_dir, folder("same", vocab)).get_vocab() == own.get_vocab()


def test_hub_name_teacher_is_checked_too(tiny_teacher, bert_tokenizers, tmp_path):
    """A teacher named by its hub id, resolved from the local hub cache (offline), as a user who
    downloaded it before would: its tokenizer is compared like a folder's."""
    snapshot_dir = tmp_path / "hub" / "models--someone--tiny-bert" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_teacher, snapshot_dir)
    (tmp_path / "hub" / "models--someone--tiny-bert" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-bert" / "refs" / "main").write_text("0" * 40)
    script = (f"from pretrained import StudentError, load_teacher, load_tokenizer\n"
              f"teacher = load_teacher('someone/tiny-bert')\n"
              f"load_tokenizer(teacher, 'someone/tiny-bert', {bert_tokenizers['same']!r})\n"
              f"try:\n"
              f"    load_tokenizer(teacher, 'someone/tiny-bert', {bert_tokenizers['swapped']!r})\n"
              f"except StudentError as e:\n"
              f"    print(e)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "its vocabulary differs from the teacher's own tokenizer" in result.stdout, result.stdout


def test_saved_student_files_are_readable_as_the_umask_allows(tiny_teacher, tmp_path):
    """transformers 5 writes model.safetensors with mode 0600: save_student gives every file of the
    student what the user's umask gives new files, so others on a shared cluster can load it."""
    teacher = load_teacher(tiny_teacher)
    out = tmp_path / "out"
    out.mkdir()
    old = os.umask(0o022)
    try:
        save_student(make_student(teacher, [0, 2]), AutoTokenizer.from_pretrained(tiny_teacher), str(out))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
