"""The artifacts layer on local paths (the S3 side runs in test_s3_chain.py): manifests, lineage through paths inside
artifacts, checkpoint resolution, writable_dir."""

from __future__ import annotations

import json

import pytest

from pipelines.artifacts import (
    MANIFEST,
    ArtifactError,
    Manifest,
    artifact_of,
    join,
    lineage,
    list_files,
    parent,
    read_manifest,
    resolve_checkpoint,
    writable_dir,
)


def _chain(tmp_path):
    raw = tmp_path / "corpus"
    raw.mkdir()
    (raw / "a.txt").write_text("text")
    Manifest.begin("data", str(tmp_path / "data"), {}, inputs=[str(raw)]).finish()
    pt = tmp_path / "pt"
    Manifest.begin("pretrain", str(pt), {}, inputs=[str(tmp_path / "data")]).finish()
    (pt / "model").mkdir()
    (pt / "model" / "config.json").write_text("{}")
    Manifest.begin("sft-data", str(tmp_path / "sd"), {}, inputs=[str(raw)]).finish()
    (tmp_path / "sd" / "train.jsonl").write_text("")
    Manifest.begin(
        "sft", str(tmp_path / "sft"), {}, inputs=[str(pt / "model"), str(tmp_path / "sd" / "train.jsonl")]
    ).finish()
    return raw


def test_lineage_walks_paths_inside_artifacts_back_to_the_raw_corpus(tmp_path):
    raw = _chain(tmp_path)
    inputs = read_manifest(str(tmp_path / "sft"))["inputs"]
    assert [(i.get("artifact"), i["stage"]) for i in inputs] == [
        (str(tmp_path / "pt"), "pretrain"),
        (str(tmp_path / "sd"), "sft-data"),
    ]
    got = [(d, e["stage"], e["path"]) for d, e in lineage(str(tmp_path / "sft" / "model"))]  # a path inside works too
    assert got == [
        (0, "sft", str(tmp_path / "sft")),
        (1, "pretrain", str(tmp_path / "pt")),
        (2, "data", str(tmp_path / "data")),
        (3, "raw input", str(raw)),
        (1, "sft-data", str(tmp_path / "sd")),
    ]


def test_lineage_of_a_manifest_that_recorded_the_model_folder_as_raw(tmp_path):
    """Manifests written before inputs were resolved to their artifact still walk through."""
    _chain(tmp_path)
    m = json.loads((tmp_path / "sft" / MANIFEST).read_text())
    m["inputs"] = [{"path": str(tmp_path / "pt" / "model"), "kind": "raw"}]
    (tmp_path / "sft" / MANIFEST).write_text(json.dumps(m))
    stages = [e["stage"] for _, e in lineage(str(tmp_path / "sft"))]
    assert stages == ["sft", "pretrain", "data", "raw input"]


def test_paths_checkpoints_and_writable_dir(tmp_path):
    _chain(tmp_path)
    assert artifact_of(str(tmp_path / "pt" / "model" / "config.json")) == str(tmp_path / "pt")
    assert artifact_of(str(tmp_path / "corpus" / "a.txt")) is None and artifact_of("<stdlib>") is None
    assert resolve_checkpoint(str(tmp_path / "pt")) == str(tmp_path / "pt" / "model")
    with pytest.raises(ArtifactError, match="no checkpoint there"):
        resolve_checkpoint(str(tmp_path / "data"))
    assert parent("s3://b/x/y") == "s3://b/x" and parent("s3://b") is None and join("s3://b/", "m", "c") == "s3://b/m/c"
    with writable_dir(str(tmp_path / "w")) as d:
        (tmp_path / "w" / "f.txt").write_text("x")
        assert d == str(tmp_path / "w")
    assert list_files(str(tmp_path / "w")) == [str(tmp_path / "w" / "f.txt")]
    with pytest.raises(ArtifactError, match="already holds a finished"):
        Manifest.begin("sft", str(tmp_path / "sft"), {})
