import json
import subprocess
import sys

import pytest

from cluster.cli import main


def genloop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_stage():
    r = genloop("--help")
    assert r.returncode == 0
    for stage in ("data", "pretrain", "sft", "serve", "submit", "lineage", "tokenizer"):
        assert stage in r.stdout


def test_unknown_stage_is_a_clear_error(capsys):
    assert main(["pretrian"]) == 2
    assert "unknown command 'pretrian'" in capsys.readouterr().err


def test_tokenizer_train_writes_artifact_refuses_overwrite_and_has_lineage(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def add(a, b):\n    return a + b\n" * 50)
    (corpus / "b.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    out = tmp_path / "tok"
    r = genloop("tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "tokenizer" and manifest["status"] == "finished"
    assert manifest["counts"]["n_vocab"] == 300 and manifest["inputs"][0]["kind"] == "raw"
    again = genloop("tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out))
    assert again.returncode == 1 and "already holds a finished tokenizer artifact" in again.stderr
    assert "Traceback" not in again.stderr
    shown = genloop("tokenizer", "show", str(out), "def add")
    assert json.loads(shown.stdout)["n_vocab"] == 300
    lin = genloop("lineage", str(out))
    assert lin.returncode == 0 and "tokenizer:" in lin.stdout and "raw input" in lin.stdout


def test_input_matching_nothing_is_a_clear_error(tmp_path):
    r = genloop("tokenizer", "train", "--input", str(tmp_path / "nope*.txt"), "--out", str(tmp_path / "t"))
    assert r.returncode == 1 and "matches no files" in r.stderr and "Traceback" not in r.stderr


def test_lineage_of_a_non_artifact_is_a_clear_error(tmp_path):
    r = genloop("lineage", str(tmp_path))
    assert r.returncode == 1 and "is not a genloop artifact" in r.stderr
