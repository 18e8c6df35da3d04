import json
import subprocess
import sys

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


def test_shared_options_come_from_one_helper_and_address_goes_either_side(monkeypatch):
    """Every stage command gets --config, --overwrite (when it writes an artifact), --address and key=value from
    cluster.commands.base; --address works before or after the command name, else $RAY_ADDRESS."""
    import argparse

    from cluster.cli import build_parser
    from cluster.commands import COMMANDS
    from cluster.commands.base import address_of

    for c in COMMANDS:
        if not hasattr(c.load(), "config"):
            continue
        sub = next(a for a in build_parser(c.name)._actions if isinstance(a, argparse._SubParsersAction))
        opts = {o for a in sub.choices[c.name]._actions for o in a.option_strings}
        dests = {a.dest for a in sub.choices[c.name]._actions}
        assert {"--config", "--help"} <= opts and "overrides" in dests, c.name
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    after = build_parser("data").parse_args(["data", "--address", "ray://h:10001", "seq_len=32"])
    before = build_parser("data").parse_args(["--address", "ray://h:10001", "data", "seq_len=32"])
    neither = build_parser("data").parse_args(["data"])
    assert address_of(after) == address_of(before) == "ray://h:10001" and address_of(neither) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert address_of(build_parser("data").parse_args(["data"])) == "10.0.0.1:6379"
