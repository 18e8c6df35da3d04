"""Hybrid retrieval: code-aware terms, RRF, and the vector index following the SQLite store through add, replace,
delete and `knowledge sync` (a deleted document is never returned); the index rebuilt when missing, corrupt or of
another embedder; another embedder's store refused. Plain SQLite + faiss, no Ray."""

from __future__ import annotations

import dataclasses
import sqlite3

import numpy as np
import pytest

from serve.knowledge import KnowledgeStore, rrf
from serve.knowledge_sync import FolderSync
from serve.terms import code_terms, match_query, split_identifier
from serve.vectors import HashEmbedder, VectorError, VectorIndex, load_embedder


class KeywordEmbedder:
    """A dense side we can steer: a text's vector is which of a few 'concept' words it holds (synonyms share one
    dimension, so it finds what BM25 cannot: 'automobile' for 'car')."""

    CONCEPTS = [("car", "automobile", "vehicle"), ("cat", "feline", "kitten"), ("rain", "weather", "storm")]
    identity, dim, max_chars = "keywords:v1", 4, 10_000

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            words = set(code_terms(t))
            for j, c in enumerate(self.CONCEPTS):
                out[i, j] = float(len(words & set(c)))
            out[i, 3] = 0.01  # every text a little alike: a list of all of them, by closeness
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_split_identifier_snake_camel_dotted_digits_and_acronyms():
    assert split_identifier("json.loads") == ["json.loads", "json", "loads"]
    assert split_identifier("TemporaryDirectory") == ["temporarydirectory", "temporary", "directory"]
    assert split_identifier("snake_case_name") == ["snake_case_name", "snake", "case", "name"]
    assert split_identifier("get_HTTPServer2") == ["get_httpserver2", "get", "httpserver2", "http", "server", "2"]
    assert split_identifier("b64decode") == ["b64decode", "b", "64", "decode"]
    assert split_identifier("__init__") == ["__init__", "init"]
    assert split_identifier("Parse") == ["parse"] and split_identifier("ABC") == ["abc"]
    assert split_identifier("café_Straße") == ["café_straße", "café", "straße"]  # no ASCII case rules on them
    assert code_terms("use os.path.join(a)") == ["use", "os.path.join", "os", "path", "join", "a"]
    assert match_query('What is "json" OR NEAR(x)?') == '"what" OR "is" OR "json" OR "or" OR "near" OR "x"'
    assert match_query("  ?! ") == ""


def test_lexical_search_matches_identifier_parts_and_weights_the_path(tmp_path):
    s = KnowledgeStore(tmp_path)
    s.add("lib/tempfile.py", "def TemporaryDirectory(): ...\nclass SpooledFile: pass", title="tempfile.py")
    s.add("lib/misc.py", "Nothing temporary here.", title="misc.py")
    s.add("lib/b.py", "def b64decode(s): return decode_base(s)", title="b.py")
    assert s.search("temporary directory", 1)[0].doc_id == "lib/tempfile.py"  # both words: only in the identifier
    assert s.search("TemporaryDirectory", 1)[0].doc_id == "lib/tempfile.py"
    assert s.search("decode base64", 1)[0].doc_id == "lib/b.py"
    assert s.search("spooled", 1)[0].doc_id == "lib/tempfile.py"  # a CamelCase part
    assert s.search("tempfile", 1)[0].doc_id == "lib/tempfile.py"  # title and path are searched
    assert s.search("misc", 1)[0].doc_id == "lib/misc.py"


def test_old_store_is_reindexed_with_code_aware_terms(tmp_path):
    db = sqlite3.connect(tmp_path / "knowledge.db")
    db.execute(
        "CREATE TABLE documents (id TEXT PRIMARY KEY, title TEXT NOT NULL, n_chars INTEGER, n_chunks INTEGER, "
        "added_at REAL, content_hash TEXT, source TEXT)"
    )
    db.execute(
        "CREATE VIRTUAL TABLE chunks USING fts5(doc_id UNINDEXED, seq UNINDEXED, title, body, tokenize='unicode61')"
    )
    db.execute("INSERT INTO documents VALUES ('a', 'A', 20, 1, 0, NULL, NULL)")
    db.execute("INSERT INTO chunks VALUES ('a', 0, 'A', 'call TemporaryDirectory now')")
    db.commit()
    db.close()
    s = KnowledgeStore(tmp_path)
    hit = s.search("temporary directory", 1)
    assert [h.doc_id for h in hit] == ["a"] and hit[0].text == "call TemporaryDirectory now"
    s.add("b", "more text")
    assert s.count() == 2 and s.search("more", 1)[0].doc_id == "b"
    db = sqlite3.connect(tmp_path / "knowledge.db")
    assert db.execute("SELECT rowid, doc_id FROM chunks ORDER BY rowid").fetchall() == [(1, "a"), (2, "b")]


def test_rrf_one_based_ranks_and_either_side():
    fused = rrf([["a", "b", "c"], ["c", "d"]], k=60)
    score = dict(fused)
    assert score["a"] == pytest.approx(1 / 61) and score["b"] == pytest.approx(1 / 62)
    assert score["c"] == pytest.approx(1 / 63 + 1 / 61) and score["d"] == pytest.approx(1 / 62)
    assert [i for i, _ in fused] == ["c", "a", "b", "d"]  # b and d tie at 1/62: b was seen first
    assert [i for i, _ in rrf([["x", "x", "y"]], k=0)] == ["x", "y"] and dict(rrf([["x", "x"]], 0))["x"] == 1.0
    assert rrf([[], []]) == []


def test_hybrid_ranks_a_document_found_by_either_side(tmp_path):
    s = KnowledgeStore(tmp_path, embedder=KeywordEmbedder(), candidates=10)
    s.add("d1", "An automobile has four wheels and an engine.", title="Autos")
    s.add("d2", "A feline purrs.", title="Felines")
    s.add("d3", "The zxq_frobnicate function frobnicates a buffer.", title="frob")
    # only the dense side can find it: no word in common
    assert s.search("car", 3, mode="lexical") == []
    assert s.search("car", 1)[0].doc_id == "d1"
    # only the lexical side knows the identifier: the dense side ranks every chunk about the same
    assert s.search("zxq_frobnicate", 1)[0].doc_id == "d3"
    both = s.search("kitten frobnicate", 3)
    assert {p.doc_id for p in both[:2]} == {"d2", "d3"} and both[0].score > both[-1].score


def test_vectors_follow_add_replace_delete_and_never_return_a_deleted_document(tmp_path):
    s = KnowledgeStore(tmp_path, embedder=KeywordEmbedder())
    s.add("cars", "An automobile has four wheels.")
    assert [p.doc_id for p in s.search("vehicle", 1, mode="dense")] == ["cars"]
    s.add("cars", "A kitten sleeps all day.")  # replaced: its old vector goes, the new one comes
    assert s.search("vehicle", 3, mode="dense")[0].doc_id == "cars" and "kitten" in s.search("cat", 1)[0].text
    assert all("automobile" not in p.text for p in s.search("vehicle", 5, mode="dense"))
    s.add("storm", "Heavy rain tonight.")
    assert s.delete("cars") is True
    for mode in ("lexical", "dense", "hybrid"):
        assert all(p.doc_id != "cars" for p in s.search("kitten cat car", 5, mode=mode))
    assert len(s._index) == 1
    # a writer without an embedder (another process: the CLI) writes; the next search catches the index up
    other = KnowledgeStore(tmp_path)
    other.add("auto", "The vehicle is red.")
    other.delete("storm")
    hits = s.search("automobile weather", 5, mode="dense")
    assert [p.doc_id for p in hits] == ["auto"] and len(s._index) == 1


def test_knowledge_sync_keeps_both_indexes_in_step(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("An automobile story.")
    (folder / "b.md").write_text("A feline story.")
    s = KnowledgeStore(tmp_path / "store", embedder=KeywordEmbedder())
    cli = KnowledgeStore(tmp_path / "store")  # `genloop knowledge sync` has no embedder
    sync = FolderSync(cli, folder)
    sync.sync()
    assert s.search("vehicle", 1)[0].doc_id == "docs/a.md"
    (folder / "a.md").unlink()
    (folder / "b.md").write_text("Storms and rain.")
    (folder / "c.md").write_text("A car again.")
    r = sync.sync()
    assert (r.added, r.replaced, r.removed) == (1, 1, 1)
    for mode in ("lexical", "dense", "hybrid"):
        got = {p.doc_id for p in s.search("automobile feline weather story", 5, mode=mode)}
        assert "docs/a.md" not in got
    assert s.search("vehicle", 1, mode="dense")[0].doc_id == "docs/c.md"
    assert s.search("weather", 1, mode="dense")[0].doc_id == "docs/b.md"
    assert len(s._index) == 2


def test_index_is_saved_reloaded_and_rebuilt_when_missing_or_corrupt(tmp_path, caplog):
    s = KnowledgeStore(tmp_path, embedder=HashEmbedder(64))
    s.add("a", "alpha beta gamma")
    s.add("b", "delta epsilon")
    assert s.reindex()["vectors"] == 2
    s.close()
    base = tmp_path / "knowledge.vectors"
    assert (tmp_path / "knowledge.vectors.faiss").exists()
    loaded = VectorIndex.load(base, 64, "hash:64")
    assert loaded is not None and loaded.ids == {1, 2}
    assert VectorIndex.load(base, 32, "hash:32") is None  # another dimension / embedder: not used
    (tmp_path / "knowledge.vectors.faiss").write_bytes(b"not an index")
    again = KnowledgeStore(tmp_path, embedder=HashEmbedder(64))
    assert again.search("epsilon", 1, mode="dense")[0].doc_id == "b" and len(again._index) == 2
    assert "unreadable" in caplog.text
    (tmp_path / "knowledge.vectors.faiss").unlink()
    third = KnowledgeStore(tmp_path, embedder=HashEmbedder(64))
    assert third.search("alpha", 1, mode="dense")[0].doc_id == "a"


def test_another_embedder_is_refused_or_reindexes(tmp_path):
    s = KnowledgeStore(tmp_path, embedder=HashEmbedder(64))
    s.add("a", "alpha beta")
    s.reindex()
    s.close()
    with pytest.raises(VectorError, match="indexed for embedder hash:64.*configured with hash:32"):
        KnowledgeStore(tmp_path, embedder=HashEmbedder(32))
    r = KnowledgeStore(tmp_path, embedder=HashEmbedder(32), reindex=True)
    assert r.search("alpha", 1, mode="dense")[0].doc_id == "a" and r._index.dim == 32
    with pytest.raises(VectorError, match="over what embedder"):
        KnowledgeStore(tmp_path / "x", chunk_chars=600, embedder=type("E", (KeywordEmbedder,), {"max_chars": 100})())
    idx = VectorIndex(4, "x")
    with pytest.raises(VectorError, match="dimension"):
        idx.add([1], np.ones((1, 8), np.float32))
    with pytest.raises(VectorError, match="hash:DIM"):
        load_embedder("hash:abc")
    assert load_embedder("") is None


def test_rag_eval_on_a_planted_store_gives_the_hand_counted_recall(tmp_path, capsys):
    import argparse
    import json

    from cluster.commands import rag_eval as cmd
    from serve.rag_eval import doc_ranking, evaluate, metrics

    # hand count: q1 rank 1, q2 rank 2, q3 not found -> recall@1 1/3, recall@5 2/3, MRR (1 + 1/2 + 0) / 3
    assert metrics([["a", "b"], ["b", "a"], ["c"]], ["a", "a", "z"]) == pytest.approx(
        {"recall@1": 1 / 3, "recall@5": 2 / 3, "mrr": 0.5}
    )
    s = KnowledgeStore(tmp_path / "store", chunk_chars=60, chunk_overlap=0)
    s.add("zebra", "Zebras have black and white stripes. " * 4)  # several chunks, one document in the ranking
    s.add("lion", "Lions are big cats that roar. Lions hunt zebras.")
    s.add("moon", "The moon orbits the earth.")
    qs = [
        {"question": "striped zebras black white", "doc": "zebra"},  # rank 1
        {"question": "what do lions hunt", "doc": "lion"},  # rank 1
        {"question": "zebras", "doc": "lion"},  # rank 2: zebra's chunks outscore it, counted once
        {"question": "orbit of mars", "doc": "moon"},
    ]  # "orbit" != "orbits" (no stemming): not found
    assert doc_ranking(s, "zebras", "lexical", 10) == ["zebra", "lion"]
    r = evaluate(qs, {"bm25": lambda q: doc_ranking(s, q, "lexical", 10)})["bm25"]
    assert (r["recall@1"], r["recall@5"], r["mrr"]) == pytest.approx((2 / 4, 3 / 4, (1 + 1 + 0.5 + 0) / 4))
    assert r["misses"] == ["orbit of mars"]
    s.close()
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(
        ["rag-eval", "--questions", str(qfile), "--store", str(tmp_path / "store"), "--depth", "10"]
        + ["--embedder", "hash:64", "--candidates", "10", "--json", str(tmp_path / "r.json")]
    )
    assert cmd.run(args) == 0
    out = capsys.readouterr().out
    assert "BM25" in out and "hybrid RRF k=60" in out and "0.500     0.750     0.625" in out
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert set(res) == {"lexical", "dense", "hybrid"} and res["lexical"]["mrr"] == pytest.approx(0.625)


def test_stdlib_questions_do_not_name_their_module():
    from serve.rag_eval import question_from

    q = question_from("stdlib/tempfile.py", "Temporary files.\n\nThis module provides generic, low- and high-level...")
    assert q is None  # "Temporary files" is two words: too little to ask about
    q = question_from("stdlib/json/decoder.py", "Implementation of JSONDecoder and the json decoder helpers.")
    assert q is not None and "decoder" not in q.lower().split() and "json" not in q.lower().split()
    assert question_from("stdlib/encodings/cp1252.py", "Python Character Mapping Codec cp1252 generated from x") is None
    q = question_from("stdlib/shutil.py", "Utility functions for copying and archiving files and directory trees.")
    assert q.endswith("copying and archiving files and folder trees?")


def test_retriever_with_an_embedder_serves_hybrid_context_and_follows_its_writes(tmp_path):
    from serve.retriever import Retriever
    from serve.vectors import check_embedder_spec

    (tmp_path / "k").mkdir()
    KnowledgeStore(tmp_path / "k").add("old", "An automobile manual.")  # written before the retriever started
    r = Retriever(tmp_path / "k", tmp_path / "memory.db", embedder="hash:64", rrf_k=60, candidates=10)
    assert (tmp_path / "k" / "knowledge.vectors.faiss").exists()  # built at start
    r.add_documents([{"id": "new", "text": "The zebra has stripes."}])
    got = r.context("zebra stripes", None, 2, 0)["passages"]
    assert got[0]["doc_id"] == "new" and got[0]["score"] > 0
    assert r.delete_document("new") is True
    assert all(p["doc_id"] != "new" for p in r.context("zebra stripes", None, 5, 0)["passages"])
    check_embedder_spec("")
    with pytest.raises(VectorError, match="hash:DIM"):
        check_embedder_spec("hash:x")  # what serve.config.check_config runs before any replica starts
    with pytest.raises(VectorError, match="not a folder"):
        check_embedder_spec(f"lsa:{tmp_path}/missing")


def test_checkpoint_embedder_hidden_states_and_its_limits(tmp_path, tiny_checkpoint):
    e = load_embedder(f"ckpt:{tiny_checkpoint}")
    assert e.identity.startswith("ckpt-mean:") and e.max_chars == 128 and e.dim == 64
    v = e.embed(["def parse(x): return x", "a" * 5000])  # the second is cut to the context (logged)
    assert v.shape == (2, 64) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert load_embedder(str(tiny_checkpoint)).identity == e.identity  # a bare checkpoint folder works too
    with pytest.raises(VectorError, match="lower chunk_chars to 128"):
        KnowledgeStore(tmp_path / "a", chunk_chars=600, embedder=e)
    s = KnowledgeStore(tmp_path / "b", chunk_chars=120, chunk_overlap=10, embedder=e)
    s.add("x", "import json\njson.loads('{}')")
    assert [p.doc_id for p in s.search("json", 1, mode="dense")] == ["x"]


def test_checkpoint_embedder_cuts_inputs_where_its_bi_encoder_was_trained_to(tmp_path, tiny_checkpoint):
    """A bi-encoder from embed-train records its max_tokens (embedder.json): serving cuts there, not at the context,
    and says so in its identity (a store embedded with the other truncation is not searched with it)."""
    import json
    import shutil

    model = tmp_path / "bi" / "model"
    shutil.copytree(tiny_checkpoint, model)
    (model / "embedder.json").write_text(json.dumps({"max_tokens": 8, "pooling": "mean"}))
    e, plain = load_embedder(f"ckpt:{tmp_path / 'bi'}"), load_embedder(f"ckpt:{tiny_checkpoint}")
    assert e.max_tokens == 8 and "-8t:" in e.identity and e.identity != plain.identity
    text = "def parse(text, strict=True):\n    return json.loads(text)  # a function longer than eight tokens"
    head = e.tok.decode(e.tok.encode(text)[:8])
    assert len(e.tok.encode(text)) > 8 and e.tok.encode(head) == e.tok.encode(text)[:8]
    assert np.allclose(e.embed([text]), plain.embed([head]), atol=1e-5)
    assert not np.allclose(plain.embed([text]), plain.embed([head]), atol=1e-3)
    (model / "embedder.json").write_text("[1, 2]")
    with pytest.raises(VectorError, match="embedder.json: not an embedder settings file"):
        load_embedder(f"ckpt:{tmp_path / 'bi'}")


def test_v1_embeddings_can_serve_the_retrievers_embedder(tmp_path, tiny_checkpoint):
    """serve.embeddings_from=retriever: /v1/embeddings answers with serve.rag_embedder (a ckpt: bi-encoder from
    `genloop embed-train`), which reads text; the config is refused without an embedder."""
    from types import SimpleNamespace

    from serve.api import Ingress
    from serve.config import ServeConfig, check_config
    from serve.errors import APIError
    from serve.retriever import Retriever

    (tmp_path / "k").mkdir()
    r = Retriever(tmp_path / "k", tmp_path / "memory.db", embedder=f"ckpt:{tiny_checkpoint}", chunk_chars=120)
    got = r.embed(["def parse(x): return x", "a zebra"])
    e = r.knowledge.embedder
    assert got["identity"] == e.identity and np.allclose(got["vectors"], e.embed(["def parse(x): return x", "a zebra"]))
    assert got["tokens"] == len(e.tok.encode("def parse(x): return x")) + len(e.tok.encode("a zebra"))
    with pytest.raises(ValueError, match="rag_embedder"):
        Retriever(tmp_path / "k", tmp_path / "m2.db").embed(["x"])
    ok = ServeConfig(model=str(tiny_checkpoint), knowledge=str(tmp_path / "k"), rag_embedder=f"ckpt:{tiny_checkpoint}")
    check_config(ok)
    check_config(dataclasses.replace(ok, embeddings_from="retriever"))
    with pytest.raises(ValueError, match="rag_embedder, which is empty"):
        check_config(dataclasses.replace(ok, embeddings_from="retriever", rag_embedder=""))
    with pytest.raises(ValueError, match="use one of"):
        check_config(dataclasses.replace(ok, embeddings_from="both"))
    texts = Ingress.func_or_class._embedding_texts  # the route's input check, without a server
    host = SimpleNamespace(cfg=dataclasses.replace(ok, embeddings_from="retriever", max_embedding_inputs=2))
    assert texts(host, "one") == ["one"] and texts(host, ["a", "b"]) == ["a", "b"]
    for bad, why in [([1, 2], "not token ids"), (["a", "b", "c"], "limit of 2"), (["a", ""], "empty"), ([], "empty")]:
        with pytest.raises(APIError, match=why):
            texts(host, bad)
