"""Every stage on object storage: data -> pretrain -> sft-data -> sft -> knowledge add / serve's model load, each
reading and writing ``s3://`` on a local S3 (moto's server on loopback), and ``lineage`` walking the S3 artifacts
back to the raw corpus.

The endpoint and dummy credentials go into the environment when this module is imported, i.e. at collection, before
the session's Ray starts: Ray Data tasks and Ray Train workers inherit them, so every process reaches the same S3
(pyarrow reads ``AWS_ENDPOINT_URL``)."""

from __future__ import annotations

import os
import socket

import pytest

pytest.importorskip("moto.server", reason="moto[server] (test extra) runs the local S3")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
os.environ.update(
    {
        "AWS_ENDPOINT_URL": ENDPOINT,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
BUCKET = "s3://genloop-chain"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 on loopback with one bucket; the raw corpus (stdlib modules) under s3://.../raw."""
    import boto3
    from moto.server import ThreadedMotoServer

    from pipelines.artifacts import write_bytes
    from tests.helpers import STDLIB

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORT)
    server.start()
    os.environ["GENLOOP_CACHE_DIR"] = str(tmp_path_factory.mktemp("artifact_cache"))
    boto3.client("s3", endpoint_url=ENDPOINT).create_bucket(Bucket=BUCKET.split("://")[1])
    for f in sorted(STDLIB.glob("*.py"))[:40]:
        write_bytes(f"{BUCKET}/raw/{f.name}", f.read_bytes())
    yield BUCKET
    server.stop()


def test_local_copy_is_cached_until_the_artifact_changes(s3):
    from pipelines.artifacts import local_copy, write_text

    write_text(f"{s3}/cache-test/a.txt", "one")
    first = local_copy(f"{s3}/cache-test")
    assert open(os.path.join(first, "a.txt")).read() == "one"
    assert local_copy(f"{s3}/cache-test") == first  # same version: the same cached folder, no download
    write_text(f"{s3}/cache-test/a.txt", "three")  # rewritten (another size): fetched again
    second = local_copy(f"{s3}/cache-test")
    assert second != first and open(os.path.join(second, "a.txt")).read() == "three"


def test_every_stage_reads_and_writes_s3_and_lineage_reaches_the_raw_corpus(s3, ray_session, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from models.checkpoint import load_checkpoint
    from pipelines.artifacts import checkpoint_dir, exists, lineage, read_manifest
    from pipelines.config import build_config
    from pipelines.data import stage as data
    from pipelines.data.config import DataConfig
    from pipelines.pretrain import stage as pretrain
    from pipelines.pretrain.config import PretrainConfig
    from pipelines.sft import data as sft_data
    from pipelines.sft import stage as sft
    from serve.app import ServeConfig, build_app
    from serve.config import check_config
    from serve.knowledge import KnowledgeStore
    from serve.knowledge_files import add_paths

    # data: raw files on S3 -> tokenized blocks + tokenizer on S3
    counts = data.run(build_config(DataConfig, "data", "tiny", {"input": [f"{s3}/raw"], "out": f"{s3}/data"}))
    assert counts["files"] == 40 and counts["train_blocks"] > 0
    assert exists(f"{s3}/data/tokenizer/tokenizer_spec.json") and not os.path.exists("s3:")

    # pretrain: --data and --out on S3 (the tokenizer is fetched from the dataset, the model exported to S3)
    res = pretrain.run(
        build_config(
            PretrainConfig,
            "pretrain",
            "tiny",
            {"data": f"{s3}/data", "out": f"{s3}/pt", "train.steps": 4, "train.ckpt_every": 0, "train.eval_every": 4},
        )
    )
    assert res.steps == 4 and exists(f"{s3}/pt/model/config.json")

    # sft-data: --from-code and --out on S3
    stats = sft_data.run(
        build_config(
            sft_data.SftDataConfig,
            "sft-data",
            "tiny",
            {"from_code": [f"{s3}/raw"], "out": f"{s3}/sftd", "val_fraction": 0.2},
        )
    )
    assert stats["counts"]["train"] > 0 and exists(f"{s3}/sftd/train.jsonl") and exists(f"{s3}/sftd/val.jsonl")

    # sft: --init-from the pretrain artifact on S3, --data the sft-data artifact on S3, --out on S3
    out = sft.run(
        build_config(
            sft.SftConfig,
            "sft",
            "tiny",
            {
                "init_from": f"{s3}/pt",
                "data": f"{s3}/sftd",
                "out": f"{s3}/sft",
                "train.steps": 4,
                "train.eval_every": 4,
                "eval.prompts": 2,
                "eval.max_new_tokens": 8,
            },
        )
    )
    assert out["steps"] == 4 and exists(f"{s3}/sft/model/model.safetensors") and exists(f"{s3}/sft/samples.jsonl")
    assert read_manifest(f"{s3}/sft")["status"] == "finished"

    # knowledge add from S3 (the store itself is SQLite on a local disk)
    store = KnowledgeStore(tmp_path / "kb")
    assert add_paths(store, [f"{s3}/raw"]) == {"added": 40, "replaced": 0, "chunks": store_chunks(store), "skipped": 0}
    assert store.search("import", 1)

    # serving's model load from S3: the config check, the bound app, and the downloaded folder loads in
    # transformers (what vLLM reads) with genloop's own logits
    cfg = ServeConfig(model=f"{s3}/sft", knowledge=str(tmp_path / "state"))
    check_config(cfg)
    build_app(cfg)
    local = checkpoint_dir(cfg.model)
    ours, tok = load_checkpoint(local)
    hf = AutoModelForCausalLM.from_pretrained(local).eval()
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="SQLite"):
        check_config(ServeConfig(model=f"{s3}/sft", knowledge=f"{s3}/kb"))

    # lineage on S3: sft -> pretrain (through its model/) -> data -> the raw corpus, and sft -> sft-data (whose raw
    # input is the same corpus, listed once)
    chain = [(d, e["stage"], e["path"]) for d, e in lineage(f"{s3}/sft")]
    assert chain == [
        (0, "sft", f"{s3}/sft"),
        (1, "pretrain", f"{s3}/pt"),
        (2, "data", f"{s3}/data"),
        (3, "raw input", f"{s3}/raw"),
        (1, "sft-data", f"{s3}/sftd"),
    ]
    assert [i.get("artifact") for i in read_manifest(f"{s3}/sft")["inputs"]] == [f"{s3}/pt", None, f"{s3}/sftd"]


def store_chunks(store) -> int:
    with store._lock:
        return int(store._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
