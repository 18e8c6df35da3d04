"""Shared test assets: one Ray instance per session, a tiny tokenizer and a tiny checkpoint built here (no downloads),
and the helpers more than one test file uses (datasets, ports, planted texts)."""

from __future__ import annotations

import glob
import os
import socket
import sysconfig
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train V2 on one machine, set before the session's Ray starts (its processes inherit it): the controller polls
# its workers every 0.5 s instead of 2 s (a finished or killed worker is seen sooner: ~1 s less per fit, more per
# restart), and no PreemptionWatcher actor (spot-instance notices; one more Python process per fit on 2 cores)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(n: int = 60) -> list[str]:
    """A small, deterministic slice of the embedded default corpus."""
    files = sorted(glob.glob(str(STDLIB / "*.py")))[:n]
    return [Path(f).read_text(errors="replace") for f in files]


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (tests that need Ray take this fixture)."""
    import ray

    from cluster.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from models.tokenizer import train

    out = tmp_path_factory.mktemp("tokenizer")
    train(stdlib_texts(), vocab_size=1024).save(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from models.tokenizer import Tokenizer

    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    """A randomly initialised `tiny` model saved in Hugging Face format (weights scaled so greedy decoding has no
    near-ties)."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.transformer import Transformer, model_preset

    torch.manual_seed(0)
    model = Transformer(model_preset("tiny").for_tokenizer(tiny_tokenizer.n_vocab))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, tiny_tokenizer, out)
    return out


# ---- one served application for the serve modules ---------------------------------------------------------------

SERVE_KEYS = ("key-alpha-123", "key-bravo-456")  # API keys (two: memory is private per key)
SERVE_ADMIN_KEY = "admin-key-456"
SERVE_APP, SERVE_PREFIX = "genloop-test", "/genloop-test"
_served: dict = {}
_last_served_user: list[str] = []


@pytest.fixture(scope="session")
def served(ray_session, tiny_checkpoint, tmp_path_factory):
    """ONE Ray Serve application over the tiny checkpoint (real vLLM CPU engine, real HTTP) for test_serve,
    test_serve_openai and test_serve_versions: the app and its engine start once, not once per module. API keys and
    an admin key are on. Closed right after the last test that uses it (``pytest_runtest_teardown`` below), so its
    engine does not sit beside the later modules' jobs. A module that changes the live model puts it back."""
    from ray import serve

    from models.engine import EngineConfig
    from serve.app import DeploymentOptions, ServeConfig, build_app

    state = tmp_path_factory.mktemp("serve_state")
    (state / "keys.txt").write_text("# test keys\n" + SERVE_KEYS[0] + "\n\n" + SERVE_KEYS[1] + "\n")
    (state / "admin.txt").write_text(SERVE_ADMIN_KEY + "\n")
    port = free_port()
    cfg = ServeConfig(model=str(tiny_checkpoint), model_name="tiny", knowledge=str(state),
                      api_key_file=str(state / "keys.txt"), admin_key_file=str(state / "admin.txt"),
                      host="127.0.0.1", port=port, app_name=SERVE_APP, route_prefix=SERVE_PREFIX,
                      max_body_bytes=20_000, max_document_chars=5_000, max_tokens_cap=64, default_max_tokens=16,
                      rate_limit_per_minute=0, chunk_chars=200, chunk_overlap=20,
                      engine=EngineConfig(max_num_seqs=8, kv_cache_gib=1), generator=DeploymentOptions(num_cpus=1),
                      retriever=DeploymentOptions(num_cpus=0.1), ingress=DeploymentOptions(num_cpus=0.1))
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def up() -> None:
        serve.run(build_app(cfg), name=SERVE_APP, route_prefix=SERVE_PREFIX)

    up()
    _served["up"] = True
    yield {"base": f"http://127.0.0.1:{port}{SERVE_PREFIX}", "cfg": cfg, "restart": up, "state": state,
           "app": SERVE_APP}
    _close_served()


def _close_served() -> None:
    if _served.pop("up", None):
        from ray import serve

        serve.shutdown()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    users = [it.nodeid for it in items if "served" in getattr(it, "fixturenames", ())]
    _last_served_user[:] = users[-1:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the item's own fixtures (a module's put-back) are torn down first
    if _last_served_user and item.nodeid == _last_served_user[0]:
        _close_served()


# ---- helpers shared between test files ---------------------------------------------------------------------------

def make_dataset(out: Path, tok, texts: list[str], seq_len: int, val_blocks: int = 4) -> Path:
    """A genloop tokenized dataset folder (blocks.py contract): documents joined by <|endoftext|>, cut into
    seq_len + 1 blocks, the last ``val_blocks`` held out."""
    from pipelines.artifacts import Manifest
    from pipelines.blocks import write_shard

    ids: list[int] = []
    for doc in tok.encode_batch(texts):
        ids += doc + [tok.eot_id]
    n = len(ids) // (seq_len + 1)
    blocks = np.asarray(ids[: n * (seq_len + 1)], dtype=np.int32).reshape(n, seq_len + 1)
    train, val = blocks[: n - val_blocks], blocks[n - val_blocks:]
    m = Manifest.begin("data", str(out), {"seq_len": seq_len})
    half = len(train) // 2
    write_shard(train[:half], str(out / "train"), 0)
    write_shard(train[half:], str(out / "train"), 1)
    write_shard(val, str(out / "val"), 0)
    tok.save(out / "tokenizer")
    m.finish(counts={"train_blocks": len(train), "val_blocks": len(val)})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# texts that stress a tokenizer: code with tabs/CRLF, non-Latin scripts, emoji, digits, chat specials, empty
VARIED = [
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\r\n        pass\n",
    "Ünïcödé façade — naïve café; 日本語のテキスト, emoji 🙂🚀 and Ελληνικά.",
    "numbers 1234567 3.14159 0x1F and   multiple   spaces   \n\n\n trailing   ",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n<|endoftext|>",
    "it's we're they'll I'd you've DON'T",
    "",
]


_STOP = ["the", "and", "of", "to", "with", "that", "have", "be"]


def vocabulary(n: int = 3000, seed: int = 0) -> list[str]:
    """Pronounceable pseudo-words of 3..9 letters (unique), so Gopher's word-length and alpha rules pass."""
    rng = np.random.default_rng(seed)
    cons, vows = "bcdfghklmnprstvz", "aeiou"
    out: set[str] = set()
    while len(out) < n:
        k = int(rng.integers(2, 5))
        out.add("".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))] for _ in range(k)))
    return sorted(out)


def prose_words(rng: np.random.Generator, vocab: list[str], n: int) -> list[str]:
    """Random words with a stop word every ~4 words (natural enough for Gopher's and C4's rules)."""
    return [_STOP[rng.integers(len(_STOP))] if rng.random() < 0.25 else vocab[rng.integers(len(vocab))]
            for _ in range(n)]


def render(words: list[str], per_line: int = 12) -> str:
    """Lines of ``per_line`` words, each a sentence ending with a period."""
    lines = [" ".join(words[i:i + per_line]).capitalize() + "." for i in range(0, len(words), per_line)]
    return "\n".join(lines) + "\n"


def edit(words: list[str], k: int, rng: np.random.Generator, vocab: list[str]) -> list[str]:
    """Replace ``k`` words at evenly spread positions (at least 5 apart) by fresh words."""
    out = list(words)
    n = len(out)
    for p in np.linspace(3, n - 4, k).astype(int):
        out[p] = "zq" + vocab[rng.integers(len(vocab))]
    return out


def jaccard(a: list[str], b: list[str], n: int = 5) -> float:
    """True Jaccard of the word n-gram sets, computed without hashing."""
    sa = {tuple(w.lower() for w in a[i:i + n]) for i in range(len(a) - n + 1)}
    sb = {tuple(w.lower() for w in b[i:i + n]) for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)
