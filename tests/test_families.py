"""Every teacher family, end to end: tiny random masked LMs with their own kind of tokenizer.

For each family (BERT uncased, cased and multilingual WordPiece; RoBERTa byte-level BPE; XLM-R and
CamemBERT SentencePiece-style Unigram; ELECTRA generator; DeBERTa-v2 with both MLM heads; DistilBERT;
ModernBERT; MPNet) a
4-layer teacher is built from its config and a tokenizer trained here, offline, and saved as a
Hugging Face folder. Then: a student with all layers is the teacher; a subset student saves and
reloads as the same class with the same logits; the data pipeline frames sequences with the
tokenizer's own special tokens and never masks them; a distillation step gives finite losses
and gradients; and `python train.py` runs and writes a folder AutoModelForMaskedLM loads.
ELECTRA discriminators and DeBERTa-v2 folders without an MLM head, ALBERT's shared layers and a
tokenizer that fails on text are refused in one line.
"""

import copy
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (AlbertConfig, AlbertForMaskedLM, AutoModelForMaskedLM, AutoTokenizer, BertConfig,
                          BertForMaskedLM, BertTokenizer, CamembertConfig, CamembertForMaskedLM, CamembertTokenizer,
                          DebertaV2Config, DebertaV2ForMaskedLM, DebertaV2Model, DebertaV2Tokenizer, DistilBertConfig,
                          DistilBertForMaskedLM, ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining,
                          MPNetConfig, MPNetForMaskedLM, MPNetTokenizer, ModernBertConfig, ModernBertForMaskedLM,
                          RobertaConfig, RobertaForMaskedLM, RobertaTokenizer, XLMRobertaConfig,
                          XLMRobertaForMaskedLM, XLMRobertaTokenizer)

import train
from data import collate, make_batch, make_sequences, mask_spec, to_device
from token_cache import DataError, load_corpus, read_documents
from distil import DistilConfig, distil_step
from pretrained import load_teacher, load_tokenizer, save_student, usable_positions
from student import StudentError, encoder_layers, make_narrow_student, make_student

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_LAYERS, HIDDEN, HEADS, POSITIONS = 4, 32, 2, 64

ENGLISH = ("The cat sat on a mat and the Dog ran to the big red House in a small green park with an old man who "
           "saw a bird fly over the tree near the River under a blue sky every day because it was warm").split()
FRENCH = ("Le chat dormait sur le tapis et le chien courait vers la grande maison près de la rivière où un "
          "vieil homme a vu un oiseau voler au-dessus de l'arbre ; c'était l'été à Besançon , déjà !").split()
MULTILINGUAL = ENGLISH[:20] + FRENCH[:20] + (
    "Кошка сидела на ковре и смотрела в окно Москва "    # Russian
    "Η γάτα κάθεται στο χαλί και κοιτάζει έξω Αθήνα "    # Greek
    "猫 が 窓 の 外 を 見 て いる 東京 北京 "             # Japanese and Chinese (split per character by BERT)
    "naïve café résumé Ærøskøbing Łódź Straße").split()


def sentences(words, n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 30))) for _ in range(n)]


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---- tokenizers, each built offline the way its family's real one is made ----

def wordpiece_tokenizer(folder, words, lowercase):
    """BERT's WordPiece: whole words, every character, and every character as a ## continuation."""
    words = [w.lower() for w in words] if lowercase else words
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words) - set(chars)) + chars + \
        ["##" + c for c in chars]
    write_lines(os.path.join(folder, "vocab.txt"), vocab)
    # cased and multilingual BERT keep case and accents, as bert-base-(multilingual-)cased does
    return BertTokenizer(vocab=os.path.join(folder, "vocab.txt"), do_lower_case=lowercase,
                         strip_accents=None if lowercase else False)


def byte_bpe_tokenizer(texts):
    """RoBERTa's byte-level BPE, trained here: <s>=0 <pad>=1 </s>=2 <unk>=3, as roberta-base."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges)


def unigram_pieces(texts, special):
    """A SentencePiece-style Unigram vocabulary, [(piece, log-probability)], specials first in order."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=special, unk_token=special[3 if "<unk>" in special else 1],
        show_progress=False))
    return [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]


def xlmr_tokenizer(texts):
    # xlm-roberta-base: <s>=0 <pad>=1 </s>=2 <unk>=3, pieces, <mask> last
    return XLMRobertaTokenizer(vocab=unigram_pieces(texts, ["<s>", "<pad>", "</s>", "<unk>"]) + [("<mask>", 0.0)])


def camembert_tokenizer(texts):
    # camembert-base: <s>NOTUSED=0 <pad>=1 </s>NOTUSED=2 <unk>=3 <unk>NOTUSED=4 <s>=5 </s>=6, pieces, <mask> last
    special = ["<s>NOTUSED", "<pad>", "</s>NOTUSED", "<unk>", "<unk>NOTUSED", "<s>", "</s>"]
    return CamembertTokenizer(vocab=unigram_pieces(texts, special) + [("<mask>", 0.0)])


def deberta_tokenizer(texts):
    # deberta-v3: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, pieces, [MASK] last
    return DebertaV2Tokenizer(vocab=unigram_pieces(texts, ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]) + [("[MASK]", 0.0)])


def mpnet_tokenizer(folder):
    # mpnet-base: <s>=0 <pad>=1 </s>=2 <unk>=3, then BERT's WordPiece vocabulary (whose [UNK] it uses),
    # <mask> last
    wordpiece_tokenizer(folder, ENGLISH, lowercase=True)
    vocab = open(os.path.join(folder, "vocab.txt")).read().split()
    write_lines(os.path.join(folder, "vocab.txt"), ["<s>", "<pad>", "</s>", "<unk>"] + vocab + ["<mask>"])
    return MPNetTokenizer(vocab=os.path.join(folder, "vocab.txt"), do_lower_case=True)


# ---- the families: (words of its corpus, tokenizer, model class, config) ----

def tiny(config_class, tokenizer, **extra):
    sizes = dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=N_LAYERS,
                 num_attention_heads=HEADS, intermediate_size=2 * HIDDEN, max_position_embeddings=POSITIONS,
                 pad_token_id=tokenizer.pad_token_id)
    return config_class(**{**sizes, **extra})


def roberta_style(config_class, tokenizer):
    # positions are numbered from pad + 1: 2 more rows than usable positions, as roberta-base's 514
    return tiny(config_class, tokenizer, max_position_embeddings=POSITIONS + tokenizer.pad_token_id + 1,
                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, type_vocab_size=1)


def deberta_config(tokenizer, legacy):
    # relative attention with buckets, no absolute positions, a convolution after the first layer:
    # rel_embeddings, the encoder's LayerNorm and conv sit outside the layer list
    return tiny(DebertaV2Config, tokenizer, relative_attention=True, position_biased_input=False,
                pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1,
                norm_rel_ebd="layer_norm", share_att_key=True, conv_kernel_size=3, type_vocab_size=0,
                legacy=legacy, hidden_act="gelu")


FAMILIES = {
    "bert-uncased": (ENGLISH, lambda d, t: wordpiece_tokenizer(d, ENGLISH, lowercase=True), BertForMaskedLM,
                     lambda tok: tiny(BertConfig, tok)),
    "bert-cased": (ENGLISH, lambda d, t: wordpiece_tokenizer(d, ENGLISH, lowercase=False), BertForMaskedLM,
                   lambda tok: tiny(BertConfig, tok)),
    "bert-multilingual": (MULTILINGUAL, lambda d, t: wordpiece_tokenizer(d, MULTILINGUAL, lowercase=False),
                          BertForMaskedLM, lambda tok: tiny(BertConfig, tok)),
    "roberta": (ENGLISH, lambda d, t: byte_bpe_tokenizer(t), RobertaForMaskedLM,
                lambda tok: roberta_style(RobertaConfig, tok)),
    "xlm-roberta": (MULTILINGUAL, lambda d, t: xlmr_tokenizer(t), XLMRobertaForMaskedLM,
                    lambda tok: roberta_style(XLMRobertaConfig, tok)),
    "camembert": (FRENCH, lambda d, t: camembert_tokenizer(t), CamembertForMaskedLM,
                  lambda tok: roberta_style(CamembertConfig, tok)),
    # the generator's embeddings are narrower than its layers (embeddings_project), as in ELECTRA
    "electra-generator": (ENGLISH, lambda d, t: wordpiece_tokenizer(d, ENGLISH, lowercase=True), ElectraForMaskedLM,
                          lambda tok: tiny(ElectraConfig, tok, embedding_size=HIDDEN // 2)),
    "deberta-v2": (ENGLISH, lambda d, t: deberta_tokenizer(t), DebertaV2ForMaskedLM,
                   lambda tok: deberta_config(tok, legacy=True)),
    "deberta-v2-lm-predictions": (ENGLISH, lambda d, t: deberta_tokenizer(t), DebertaV2ForMaskedLM,
                                  lambda tok: deberta_config(tok, legacy=False)),
    # a distilled teacher distilled further: DistilBERT's own names for the sizes
    "distilbert": (ENGLISH, lambda d, t: wordpiece_tokenizer(d, ENGLISH, lowercase=True), DistilBertForMaskedLM,
                   lambda tok: tiny(DistilBertConfig, tok, hidden_dim=2 * HIDDEN)),
    # rotary positions, alternating global and sliding-window attention (per-layer layer_types)
    "modernbert": (ENGLISH, lambda d, t: wordpiece_tokenizer(d, ENGLISH, lowercase=True), ModernBertForMaskedLM,
                   lambda tok: tiny(ModernBertConfig, tok, global_attn_every_n_layers=2, local_attention=8,
                                    cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                                    bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)),
    # relative attention buckets shared by all layers, positions numbered after the padding index
    "mpnet": (ENGLISH, lambda d, t: mpnet_tokenizer(d), MPNetForMaskedLM,
              lambda tok: roberta_style(MPNetConfig, tok)),
}


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """One family's teacher folder, corpora, loaded teacher and tokenizer, built once per session."""
    name = request.param
    words, make_tokenizer, model_class, make_config = FAMILIES[name]
    folder = str(tmp_path_factory.mktemp(name))
    train_txt = write_lines(os.path.join(folder, "train.txt"), sentences(words, 120, seed=1))
    valid_txt = write_lines(os.path.join(folder, "valid.txt"), sentences(words, 16, seed=2))
    model_dir = os.path.join(folder, "teacher")
    os.makedirs(model_dir)
    tokenizer = make_tokenizer(model_dir, sentences(words, 400, seed=3))
    torch.manual_seed(0)
    model_class(make_config(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    teacher = load_teacher(model_dir)  # frozen: the tests below share it and never change it
    return SimpleNamespace(name=name, folder=model_dir, train=train_txt, valid=valid_txt, teacher=teacher,
                           tokenizer=load_tokenizer(teacher, model_dir))


def encode(tokenizer, texts):
    """A padded batch of `texts` (different lengths, so padding is exercised)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=POSITIONS, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def logits(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def sample_texts(path):
    docs = [text for text, _ in read_documents(path)]
    return [docs[0][:20], " ".join(docs[1:4])]


# ---- (a) a student with all layers is the teacher ----

def test_teacher_loads_as_its_own_class_with_its_tokenizer(family):
    teacher = load_teacher(family.folder)
    assert type(teacher) is FAMILIES[family.name][2]
    tokenizer = load_tokenizer(teacher, family.folder)
    assert tokenizer.pad_token_id == teacher.config.pad_token_id
    # the tokenizer covers the corpus: no unknown pieces, whatever the script
    ids = tokenizer(sample_texts(family.train))["input_ids"]
    assert tokenizer.unk_token_id not in [i for row in ids for i in row]
    # each is the kind of tokenizer its family has
    text, pieces = {"bert-uncased": ("The House", ["the", "house"]), "bert-cased": ("The House", ["The", "House"]),
                    "bert-multilingual": ("Москва 東京 Łódź", ["Москва", "東", "京", "Łódź"]),
                    "roberta": ("The House", ["The", "ĠHouse"])}.get(family.name, (None, None))
    if pieces:
        assert tokenizer.tokenize(text) == pieces
    if family.name != "bert-uncased":  # the others are lossless (but BERT spaces out CJK characters)
        text = " ".join(FAMILIES[family.name][0][-6:])
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_all_layers_reproduce_teacher_logits(family):
    teacher, tokenizer = family.teacher, family.tokenizer
    input_ids, attention_mask = encode(tokenizer, sample_texts(family.train))
    student = make_student(teacher, list(range(N_LAYERS))).eval()
    assert len(encoder_layers(student)) == N_LAYERS
    s, t = logits(student, input_ids, attention_mask), logits(teacher, input_ids, attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(s[real], t[real], rtol=0, atol=1e-6)


def test_padding_never_changes_the_logits(family):
    """The pad id (1 for RoBERTa-style models) is honoured: position ids and attention skip padding."""
    teacher, tokenizer = family.teacher, family.tokenizer
    texts = sample_texts(family.train)
    padded_ids, padded_mask = encode(tokenizer, texts)
    alone_ids, alone_mask = encode(tokenizer, texts[:1])
    assert (padded_ids[0, alone_ids.shape[1]:] == tokenizer.pad_token_id).all()
    n = alone_ids.shape[1]
    torch.testing.assert_close(logits(teacher, padded_ids, padded_mask)[0, :n],
                               logits(teacher, alone_ids, alone_mask)[0], rtol=0, atol=1e-5)


POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert", "mpnet")


def test_usable_positions(family):
    name, teacher = family.name, family.teacher
    config = teacher.config
    padding_idx = getattr(teacher.base_model.embeddings, "padding_idx", None)
    if name in POSITIONS_AFTER_PADDING:
        assert padding_idx == config.pad_token_id == 1
        assert usable_positions(teacher) == config.max_position_embeddings - padding_idx - 1 == POSITIONS
    else:
        assert usable_positions(teacher) == config.max_position_embeddings == POSITIONS
    # the teacher takes a full-length sequence (absolute positions end exactly there)
    n = usable_positions(teacher)
    ids = torch.full((1, n), teacher.config.vocab_size - 1)
    assert logits(teacher, ids, torch.ones_like(ids)).shape == (1, n, teacher.config.vocab_size)
    if name in POSITIONS_AFTER_PADDING:
        with pytest.raises((IndexError, RuntimeError), match="out of"):  # one more: past the position table
            logits(teacher, torch.full((1, n + 1), 5), torch.ones(1, n + 1, dtype=torch.long))


# ---- (b) a subset student saves and reloads ----

def test_subset_student_saves_and_reloads(family, tmp_path):
    teacher, tokenizer = family.teacher, family.tokenizer
    layers = [0, 3]
    student = make_student(teacher, layers).eval()
    # the student's layers are exactly the teacher's chosen ones; everything outside the layer
    # list (embeddings, DeBERTa's relative embeddings and conv, the MLM head) is the teacher's
    for k, i in enumerate(layers):
        for (sn, sp), (tn, tp) in zip(encoder_layers(student)[k].named_parameters(),
                                      encoder_layers(teacher)[i].named_parameters()):
            assert sn == tn and torch.equal(sp, tp)
    layer_list = next(n for n, m in student.named_modules() if m is encoder_layers(student)) + "."
    teacher_params = dict(teacher.named_parameters())
    outside = {n: p for n, p in student.named_parameters() if not n.startswith(layer_list)}
    assert outside.keys() == {n for n in teacher_params if not n.startswith(layer_list)}
    for n, p in outside.items():
        assert torch.equal(p, teacher_params[n]), n
    out = str(tmp_path / "student")
    save_student(student, tokenizer, out)
    reloaded, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(reloaded) is type(teacher)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.num_hidden_layers == len(layers)
    input_ids, attention_mask = encode(tokenizer, sample_texts(family.train))
    real = attention_mask.bool()
    torch.testing.assert_close(logits(reloaded.eval(), input_ids, attention_mask)[real],
                               logits(student, input_ids, attention_mask)[real], rtol=0, atol=0)
    # the saved student is itself a valid teacher: its MLM head is all there
    assert type(load_teacher(out)) is type(teacher)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()


def modernbert_teacher(folder):
    words, make_tokenizer, model_class, make_config = FAMILIES["modernbert"]
    os.makedirs(folder, exist_ok=True)
    tokenizer = make_tokenizer(folder, None)
    torch.manual_seed(0)
    model_class(make_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_layers_a_family_cannot_hold_in_their_positions_are_refused(tmp_path):
    """ModernBERT's layer 0 has no attention LayerNorm: teacher layer 1 (which has one) in the
    student's position 0 would lose it on saving. Refused up front, naming a choice that works."""
    folder = modernbert_teacher(str(tmp_path / "modernbert"))
    teacher = load_teacher(folder)
    for layers, first_bad, works in (([1, 3], "teacher layer 1 in the student's position 0", "0,3"),
                                     ([2], "teacher layer 2 in the student's position 0", "0"),
                                     ([0, 2, 1], None, None)):
        if first_bad is None:
            make_student(teacher, layers)
            continue
        with pytest.raises(StudentError) as info:
            make_student(teacher, layers)
        message = str(info.value)
        assert f"--layers {','.join(map(str, layers))}: ModernBertForMaskedLM cannot hold {first_bad}" in message
        assert "attn_norm.weight" in message and f"e.g. --layers {works}" in message and "\n" not in message
        with pytest.raises(StudentError, match="cannot hold"):  # narrower students too
            make_narrow_student(teacher, layers, hidden_size=HIDDEN // 2, num_heads=1)
    # train.py refuses before anything is written
    train_txt = write_lines(str(tmp_path / "train.txt"), sentences(ENGLISH, 50, seed=1))
    with pytest.raises(StudentError, match="e.g. --layers 0,3"):
        train.main(["--teacher", folder, "--train", train_txt, "--out", str(tmp_path / "run"), "--layers", "1,3",
                    "--cache-dir", str(tmp_path / "cache"), "--seq-len", "24"])
    assert not os.path.exists(tmp_path / "run")


def test_a_saved_student_that_does_not_reload_as_trained_is_an_error(tmp_path):
    """save_student loads what it wrote and compares logits. A ModernBERT student built as the old
    make_student did (teacher layers 1 and 3, unchecked) reloads without its position-0 LayerNorm:
    the error says so, and the files stay in OUT/.saving, not where a finished model would be."""
    folder = modernbert_teacher(str(tmp_path / "modernbert"))
    teacher, tokenizer = load_teacher(folder), AutoTokenizer.from_pretrained(folder)
    student = make_student(teacher, [0, 3])
    with torch.no_grad():  # train the student a little: its weights are no longer the teacher's
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_student(student, tokenizer, str(tmp_path / "good"))
    reloaded = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "good")).eval()
    input_ids, attention_mask = encode(tokenizer, [" ".join(ENGLISH[:12]), " ".join(ENGLISH[5:9])])
    torch.testing.assert_close(logits(reloaded, input_ids, attention_mask), logits(student.eval(), input_ids,
                                                                                      attention_mask), rtol=0, atol=0)
    bad = copy.deepcopy(teacher)
    layers = encoder_layers(bad)
    kept = [layers[1], layers[3]]
    for i in reversed(range(N_LAYERS)):
        del layers[i]
    layers.extend(kept)
    bad.config.num_hidden_layers, bad.config.layer_types = 2, [bad.config.layer_types[i] for i in (1, 3)]
    bad.train()
    with torch.no_grad():  # as trained: a LayerNorm of unit weight after the embeddings' own norm changes little
        for p in bad.parameters():
            p.add_(0.05 * torch.randn_like(p))
        encoder_layers(bad)[0].attn_norm.weight.mul_(3)
    out = tmp_path / "bad"
    with pytest.raises(StudentError) as info:
        save_student(bad, tokenizer, str(out))
    message = str(info.value)
    assert "the saved student does not reload as trained" in message and "\n" not in message
    assert float(message.split("logits up to ")[1].split(" ")[0]) > 0.01
    assert not (out / "config.json").exists() and (out / ".saving" / "config.json").exists()
    assert bad.training  # its mode is left as it was


# ---- (c) data, one distillation step, and train.py ----

def test_data_uses_the_tokenizers_own_special_tokens(family, tmp_path):
    tokenizer = family.tokenizer
    # a fast tokenizer keeps its last call's padding and truncation in its backend: they must not leak in
    tokenizer(["a", "a a a"], padding="max_length", truncation=True, max_length=8)
    corpus = load_corpus(family.train, tokenizer, str(tmp_path), progress=False)
    docs = [text for text, _ in read_documents(family.train)]
    # one document per sequence, each short enough to fit: the sequence is the tokenizer's own encoding
    seqs = make_sequences(corpus, 1024, pack=False)
    assert len(seqs.starts) == len(docs)
    for i in range(0, len(docs), 7):
        input_ids, attention_mask = collate(seqs, [i], tokenizer)
        assert input_ids[0].tolist() == tokenizer(docs[i])["input_ids"], docs[i]
    # packed, masked batches: specials are never masked, never drawn as the random token
    seqs = make_sequences(corpus, 16)
    spec = mask_spec(tokenizer)
    special = set(tokenizer.all_special_ids)
    batch = make_batch(seqs, np.arange(len(seqs.starts)), tokenizer, spec, seed=0, epoch=0)
    original, _ = collate(seqs, np.arange(len(seqs.starts)), tokenizer)
    real = batch["attention_mask"].astype(bool)
    assert (original[:, 0] == tokenizer.cls_token_id).all()
    last = batch["attention_mask"].sum(1) - 1
    assert (original[np.arange(len(original)), last] == tokenizer.sep_token_id).all()
    assert (original[~real] == tokenizer.pad_token_id).all()
    predicted = batch["labels"] != -100
    assert predicted.sum() > 0.1 * real.sum()
    assert not np.isin(original[predicted], list(special)).any()
    changed = batch["input_ids"] != original
    assert not (changed & ~predicted).any()
    new = batch["input_ids"][changed]
    assert ((new == tokenizer.mask_token_id) | ~np.isin(new, list(special))).all()


LITERAL_SPECIALS = ["[MASK]", "[PAD]", "[CLS]", "[SEP]", "[UNK]", "<mask>", "<pad>", "<s>", "</s>", "<unk>",
                    "<s>NOTUSED", "<|endoftext|>"]


def test_special_token_strings_in_the_text_are_text(family, tmp_path):
    """A line that talks about [MASK] or <pad> is text: the only special ids in a sequence are the
    ones the loader puts there ([CLS]/<s> first, [SEP]/</s> last and between packed documents, the
    pad id where attention is 0); the unknown token, which stands for text, is the one exception."""
    tokenizer = family.tokenizer
    literals = sorted(set(LITERAL_SPECIALS) | set(tokenizer.all_special_tokens))
    words = FAMILIES[family.name][0]
    lines = [f"type {token} to hide a word and {' '.join(words[:3])} {token}{words[4]} ({token})" for token in literals]
    lines += [" ".join(literals), "".join(literals)]
    path = write_lines(str(tmp_path / "specials.txt"), lines)
    corpus = load_corpus(path, tokenizer, str(tmp_path / "cache"), min_tokens=1, progress=False)
    special = np.array(sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}))
    tokens = np.asarray(corpus.tokens)
    separators = np.zeros(len(tokens), bool)
    separators[corpus.doc_starts[1:] - 1] = True
    assert len(corpus.doc_starts) == len(lines) + 1
    assert (tokens[separators] == tokenizer.sep_token_id).all()
    assert not np.isin(tokens[~separators], special).any()
    # the text is there: more pieces than the words around the special strings
    assert (np.diff(corpus.doc_starts)[:len(literals)] > 9).all()
    # in batches: special ids only at the frame, the separators and the padding; padding has attention 0
    seqs = make_sequences(corpus, 16)
    original, attention_mask = collate(seqs, np.arange(len(seqs.starts)), tokenizer)
    batch = make_batch(seqs, np.arange(len(seqs.starts)), tokenizer, mask_spec(tokenizer), seed=0, epoch=0)
    real = attention_mask.astype(bool)
    frame = np.zeros_like(real)
    frame[:, 0] = True
    frame[np.arange(len(real)), real.sum(1) - 1] = True
    inner = real & ~frame
    assert ((original == tokenizer.pad_token_id) == ~real).all()
    assert (original[inner & np.isin(original, special)] == tokenizer.sep_token_id).all()
    assert (original[frame & (np.arange(real.shape[1]) == 0)] == tokenizer.cls_token_id).all()
    # the text's pieces are predicted like any other text; the labels are the original ids
    predicted = batch["labels"] != -100
    maskable = inner & ~np.isin(original, list(tokenizer.all_special_ids))  # the unknown token is not masked
    assert predicted.sum() > 0.1 * maskable.sum() and (batch["labels"][predicted] == original[predicted]).all()
    assert not np.isin(original[predicted], special).any()
    # the mask id appears only where a label is
    assert not ((batch["input_ids"] == tokenizer.mask_token_id) & ~predicted).any()


def test_distil_step_gives_finite_losses_and_gradients(family, tmp_path):
    teacher, tokenizer = family.teacher, family.tokenizer
    corpus = load_corpus(family.train, tokenizer, str(tmp_path), progress=False)
    seqs = make_sequences(corpus, 24, pack=False)
    batch = make_batch(seqs, np.arange(8), tokenizer, mask_spec(tokenizer), seed=0, epoch=0)
    batch = to_device(batch, "cpu")
    student = make_student(teacher, [0, 2])
    cfg = DistilConfig(alpha_mse=0.5, kd_on="all")  # every term on
    total, terms = distil_step(student, teacher, batch, cfg)
    assert set(terms) == {"kd", "mlm", "cos", "mse"}
    assert all(torch.isfinite(v) for v in terms.values()) and torch.isfinite(total)
    assert terms["kd"] > 0 and terms["mlm"] > 0
    total.backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    # every layer and the embeddings learn (pooler-like parameters outside the MLM path may not)
    for k in range(2):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder_layers(student)[k].parameters())
    assert student.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_train_py_runs_and_its_output_loads(family, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--teacher", family.folder, "--train", family.train,
           "--valid", family.valid, "--out", out, "--cache-dir", str(tmp_path / "cache"), "--layers", "0,3",
           "--seq-len", "24", "--batch-size", "4", "--max-steps", "4", "--eval-every", "4", "--dtype", "fp32",
           "--no-progress", "--alpha-mse", "0.1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(model) is FAMILIES[family.name][2] and model.config.num_hidden_layers == 2
    assert not info["missing_keys"] and not info["unexpected_keys"]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("valid_ppl" in r and np.isfinite(r["valid_ppl"]) for r in records)


def test_train_refuses_a_seq_len_beyond_the_positions(family, tmp_path):
    with pytest.raises(DataError, match=f"--seq-len {POSITIONS + 1} is longer than the teacher's {POSITIONS} positions"):
        train.main(["--teacher", family.folder, "--train", family.train, "--out", str(tmp_path / "run"),
                    "--cache-dir", str(tmp_path / "cache"), "--seq-len", str(POSITIONS + 1)])


def test_attention_losses_say_which_families_they_cannot_read(family, tmp_path):
    argv = ["--teacher", family.folder, "--train", family.train, "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), "--seq-len", "24", "--alpha-relation", "1"]
    if family.name.startswith(("deberta", "mpnet")):  # relative terms inside their own attention code
        with pytest.raises(StudentError, match="does not compute its attention through transformers' attention"):
            train.main(argv)
        assert not os.path.exists(tmp_path / "run")
    else:
        assert train.main(argv + ["--layers", "0,3", "--batch-size", "4", "--max-steps", "2", "--no-progress",
                                  "--alpha-attn", "1", "--dtype", "fp32"]) == 2


# ---- checkpoints trained for replaced-token detection have no MLM head ----

def electra_discriminator(folder):
    tokenizer = wordpiece_tokenizer(folder, ENGLISH, lowercase=True)
    return ElectraForPreTraining(tiny(ElectraConfig, tokenizer, embedding_size=HIDDEN)), tokenizer


def deberta_without_mlm_head(folder):
    tokenizer = deberta_tokenizer(sentences(ENGLISH, 100, seed=3))
    return DebertaV2Model(deberta_config(tokenizer, legacy=False)), tokenizer


@pytest.mark.parametrize("make", [electra_discriminator, deberta_without_mlm_head])
def test_checkpoint_without_mlm_head_is_refused(make, tmp_path):
    model, tokenizer = make(str(tmp_path))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(StudentError) as e:
        load_teacher(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message
    assert "no trained masked-LM head" in message and "replaced-token detection" in message


def test_relative_position_checkpoint_is_refused(tmp_path):
    """transformers 5 dropped BERT's relative_key positions: such a teacher would silently run without them."""
    tokenizer = wordpiece_tokenizer(str(tmp_path), ENGLISH, lowercase=True)
    BertForMaskedLM(tiny(BertConfig, tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    json.dump({**config, "position_embedding_type": "relative_key"}, open(tmp_path / "config.json", "w"))
    weights = load_file(tmp_path / "model.safetensors")
    for i in range(N_LAYERS):  # what a checkpoint trained with relative_key positions holds
        weights[f"bert.encoder.layer.{i}.attention.self.distance_embedding.weight"] = torch.randn(2 * POSITIONS - 1, 16)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StudentError) as e:
        load_teacher(str(tmp_path))
    assert "position_embedding_type='relative_key'" in str(e.value) and "\n" not in str(e.value)


def test_shared_layers_are_refused(tmp_path):
    """ALBERT runs one layer's weights at every depth: there is no subset of layers to keep."""
    tokenizer = wordpiece_tokenizer(str(tmp_path), ENGLISH, lowercase=True)
    AlbertForMaskedLM(tiny(AlbertConfig, tokenizer, embedding_size=HIDDEN)).save_pretrained(tmp_path / "albert")
    tokenizer.save_pretrained(tmp_path / "albert")
    train_txt = write_lines(str(tmp_path / "train.txt"), sentences(ENGLISH, 50, seed=1))
    with pytest.raises(StudentError) as e:
        train.main(["--teacher", str(tmp_path / "albert"), "--train", train_txt, "--out", str(tmp_path / "run"),
                    "--cache-dir", str(tmp_path / "cache"), "--seq-len", "24"])
    assert "cannot find the 4 encoder layers of AlbertForMaskedLM" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_a_tokenizer_that_fails_on_text_is_refused(tmp_path):
    """A WordPiece vocabulary without its unknown token loads, then fails on the first word it lacks."""
    wordpiece_tokenizer(str(tmp_path), ENGLISH, lowercase=True)
    vocab = [w for w in open(tmp_path / "vocab.txt").read().split() if w != "[UNK]"]
    write_lines(str(tmp_path / "vocab.txt"), vocab)
    tokenizer = BertTokenizer(vocab=str(tmp_path / "vocab.txt"), do_lower_case=True)
    BertForMaskedLM(tiny(BertConfig, tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(StudentError) as e:
        load_tokenizer(load_teacher(str(tmp_path)), str(tmp_path))
    assert "the tokenizer fails on plain text (WordPiece error: Missing [UNK]" in str(e.value)
    assert "\n" not in str(e.value)
