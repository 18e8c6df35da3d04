"""Live model versions: a running application switches checkpoints in place under a load of concurrent streaming
requests, with no failed or truncated answer; every answer names the version that produced it and equals that
checkpoint's own greedy decode (models/transformer.py generate); bad checkpoints are refused and the old version keeps
serving; `genloop deploy` switches over HTTP and over Ray. Real Ray Serve, real vLLM CPU engine, one app (conftest
``served``, shared with test_serve and test_serve_openai)."""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

import httpx
import numpy as np
import pytest

from tests.helpers import SERVE_ADMIN_KEY, SERVE_KEYS

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

KEY, ADMIN = SERVE_KEYS[0], SERVE_ADMIN_KEY
MAX_TOKENS = 12
PROMPTS = ["count to three", "write a haiku", "def main():", "what is ray?"]


def perturbed(src, out, seed: int):
    """Another checkpoint of the same architecture and tokenizer: re-drawn weights (as conftest's, scaled so greedy
    decoding has no near-ties), saved with the existing save path."""
    import torch

    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.transformer import Transformer

    model, tok = load_checkpoint(src)
    torch.manual_seed(seed)
    other = Transformer(model.cfg)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() > 1:
                p.mul_(5)
    return save_checkpoint(other, tok, out)


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint, tmp_path_factory):
    """A: the live checkpoint (bare folder: version = weights hash); B: a finished artifact (manifest digest);
    C: another architecture; D: corrupt weights."""
    import shutil

    import torch

    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.transformer import Transformer
    from pipelines.artifacts import Manifest

    root = tmp_path_factory.mktemp("versions")
    art = root / "rlhf-b"
    m = Manifest.begin("rlhf", str(art), {"note": "test"})
    perturbed(tiny_checkpoint, art / "model", seed=1)
    m.finish(counts={"steps": 0})
    model, tok = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(2)
    from dataclasses import replace

    wide = Transformer(replace(model.cfg, n_layers=model.cfg.n_layers + 1))
    save_checkpoint(wide, tok, root / "deeper")
    shutil.copytree(tiny_checkpoint, root / "corrupt")
    w = root / "corrupt" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return {"A": tiny_checkpoint, "B_artifact": art, "B": art / "model", "C": root / "deeper", "D": root / "corrupt"}


@pytest.fixture(scope="module")
def server(served, tiny_checkpoint):
    """The session's one served app (conftest ``served``): its live model is put back to the checkpoint it was
    deployed with when this module ends, for any module using the app after this one."""
    yield served
    switch(served, tiny_checkpoint)


def expected_texts(ckpt) -> dict[str, str]:
    """Each prompt's greedy answer by the checkpoint's own torch model (the text the server shows: end-of-turn ids
    are not text)."""
    from models.chat import ChatFormat
    from models.checkpoint import load_checkpoint
    from models.transformer import generate

    model, tok = load_checkpoint(ckpt)
    fmt = ChatFormat.from_checkpoint(ckpt)
    out = {}
    for p in PROMPTS:
        ids = tok.encode(fmt.render([{"role": "user", "content": p}], add_generation_prompt=True), allow_special=True)
        new = generate(model, ids, MAX_TOKENS, temperature=0.0)
        out[p] = tok.decode([t for t in new if t not in (tok.eot_id, tok.im_end_id)])
    return out


def switch(server, model, key=ADMIN) -> httpx.Response:
    return httpx.post(
        server["base"] + "/admin/models",
        json={"model": str(model)},
        headers={"Authorization": f"Bearer {key}"} if key else {},
        timeout=300,
    )


def live_version(server) -> str:
    r = httpx.get(server["base"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    return r.json()["data"][0]["model_version"]


def stream_one(client, prompt: str) -> dict:
    """One streamed chat answer: its text, the versions its chunks named, finish reasons, usage, timing."""
    t0 = time.perf_counter()
    versions, pieces, finals, usage = set(), [], [], None
    for ch in client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"rag": False, "ignore_eos": True},
    ):
        versions.add(ch.model_extra["model_version"])
        if ch.usage:
            usage = ch.usage.completion_tokens
        if ch.choices:
            pieces.append(ch.choices[0].delta.content or "")
            if ch.choices[0].finish_reason:
                finals.append(ch.choices[0].finish_reason)
    return {
        "prompt": prompt,
        "text": "".join(pieces),
        "versions": versions,
        "finals": finals,
        "tokens": usage,
        "start": t0,
        "end": time.perf_counter(),
    }


STEADY = 12  # answers in steady state on each side of the switch (6 streams: two rounds each)


def wait_for(cond, what: str, errors: list, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}; errors: {errors[:3]}"
        time.sleep(0.2)


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99)) if xs else float("nan")


# ---- the switch of every replica, without Ray: serve.versions.VersionSwitch over a fake deployment handle -----------
# (before the served tests: the served app closes after the last test that uses it, and this module's ``server``
# fixture puts the live model back when the module ends)


class FakeReplica:
    """A generator replica as ``Generator.switch`` / ``info`` answer; ``fail_on``: a version it refuses to load."""

    def __init__(self, rid: str, model: str, version: str, fail_on: str | None = None) -> None:
        self.rid, self.model, self.version, self.fail_on = rid, model, version, fail_on

    def info(self) -> dict:
        return {"model": self.model, "model_version": self.version, "switching": False, "replica": self.rid}

    def switch(self, model: str, version: str) -> dict:
        from serve.versions import SwitchError

        if version == self.fail_on:
            raise SwitchError(f"checkpoint {model} did not load on {self.rid}", 400, "checkpoint_load_failed")
        changed = version != self.version
        self.model, self.version = model, version
        return dict(self.info(), changed=changed, drain_s=0.1 if changed else 0.0, reload_s=0.2 if changed else 0.0)


class FakeGenerator:
    """A ``DeploymentHandle`` to the replicas: ``info.remote()`` reaches the first, ``broadcast`` every replica the
    router knows (``seen``: how many, per broadcast call; all when exhausted), as Ray Serve's does."""

    def __init__(self, replicas: list[FakeReplica], seen: list[int] | None = None) -> None:
        self.replicas, self.seen, self.calls = replicas, list(seen or []), []
        outer = self

        class _Info:
            @staticmethod
            async def remote() -> dict:
                return outer.replicas[0].info()

        self.info = _Info()

    def broadcast(self, method: str, *args):
        n = self.seen.pop(0) if self.seen else len(self.replicas)
        self.calls.append((method, args, n))
        results = []
        for r in self.replicas[:n]:
            try:
                results.append(getattr(r, method)(*args))
            except Exception as e:  # noqa: BLE001  (returned as Ray Serve's results_async(return_exceptions=True))
                results.append(e)

        class _Response:
            async def results_async(self, timeout_s=None, return_exceptions=False):
                assert return_exceptions
                return results

        return _Response()


def fake_switch(ckpts, replicas, seen=None, settle_s=0.3):
    from serve.versions import VersionSwitch

    gen = FakeGenerator(replicas, seen)
    board: list[tuple[str, str]] = []
    vs = VersionSwitch(
        gen,
        ckpts["A"],
        record=lambda m, v: board.append((m, v)),
        running=lambda: len(replicas),
        settle_s=settle_s,
        poll_s=0.01,
    )
    return vs, gen, board


def three_replicas(ckpts, fail_on: str | None = None) -> list[FakeReplica]:
    v_a = live_version_of_a(ckpts)
    return [FakeReplica(f"r{i}", str(ckpts["A"]), v_a, fail_on if i == 2 else None) for i in range(3)]


def test_a_switch_reaches_every_replica(ckpts):
    import asyncio

    from pipelines.artifacts import manifest_digest

    v_b = manifest_digest(str(ckpts["B_artifact"]))[:16]
    replicas = three_replicas(ckpts)
    vs, gen, board = fake_switch(ckpts, replicas, seen=[2, 3])  # the router sees the third replica one poll late
    out = asyncio.run(vs.switch(str(ckpts["B_artifact"])))
    assert out["replicas"] == 3 and out["model_version"] == v_b and out["previous_version"] == live_version_of_a(ckpts)
    assert {r.version for r in replicas} == {v_b}  # every replica, not one
    assert out["drain_s"] == 0.1 and out["reload_s"] == 0.2  # the first answer of each replica counts
    assert [c[0] for c in gen.calls] == ["switch", "switch"] and board == [(str(ckpts["B"]), v_b)]
    # a second switch to the live version changes nothing anywhere
    again = asyncio.run(vs.switch(str(ckpts["B_artifact"])))
    assert again["replicas"] == 3 and again["drain_s"] == 0.0


def test_a_replica_that_fails_switches_every_replica_back(ckpts):
    import asyncio

    from pipelines.artifacts import manifest_digest
    from serve.versions import SwitchError

    v_a, v_b = live_version_of_a(ckpts), manifest_digest(str(ckpts["B_artifact"]))[:16]
    replicas = three_replicas(ckpts, fail_on=v_b)
    vs, gen, board = fake_switch(ckpts, replicas)
    with pytest.raises(SwitchError) as e:
        asyncio.run(vs.switch(str(ckpts["B_artifact"])))
    assert (e.value.status, e.value.code) == (400, "checkpoint_load_failed") and "r2" in e.value.message
    assert {r.version for r in replicas} == {v_a}  # the two that switched were switched back
    assert board == [(str(ckpts["B"]), v_b), (str(ckpts["A"]), v_a)]  # a replica starting later loads the old one


def test_a_switch_that_cannot_reach_every_replica_fails_clearly(ckpts):
    import asyncio

    from serve.versions import SwitchError

    v_a = live_version_of_a(ckpts)
    replicas = three_replicas(ckpts)
    vs, gen, board = fake_switch(ckpts, replicas, seen=[2] * 1000)  # the router never sees the third replica
    with pytest.raises(SwitchError) as e:
        asyncio.run(vs.switch(str(ckpts["B_artifact"])))
    assert (e.value.status, e.value.code) == (503, "switch_incomplete")
    assert "reached 2 of the 3 running generator replicas" in e.value.message
    assert {r.version for r in replicas} == {v_a} and board[-1] == (str(ckpts["A"]), v_a)
    # no replica to reach at all (the deployment is down): a clear 503 too, not a 500
    vs, gen, _ = fake_switch(ckpts, replicas)

    def down(method, *args):
        raise RuntimeError("Deployment 'Generator' in application 'x' has no running replicas")

    gen.broadcast = down
    with pytest.raises(SwitchError) as e:
        asyncio.run(vs.switch(str(ckpts["B_artifact"])))
    assert (e.value.status, e.value.code) == (503, "switch_failed") and "no running replicas" in e.value.message


def test_a_replica_the_switch_missed_catches_up_at_its_next_health_check():
    """A replica that was starting while the board changed (or that the handle's router did not know yet) switches
    to the live version at its next health check; a version it cannot load is not retried; a board it cannot read
    never fails the health check."""
    import asyncio

    from serve.generator import Generator

    class Board:
        def __init__(self) -> None:
            self.entry: tuple[str, str] | None = ("/ckpt/b", "v-b")
            self.broken = False

        @property
        def get(self):
            board = self

            class _Get:
                @staticmethod
                async def remote(deployment_id: str):
                    if board.broken:
                        raise ConnectionError("board actor gone")
                    return board.entry

            return _Get()

    class Engine:
        async def check_health(self) -> None:
            pass

        def shutdown(self) -> None:  # Generator.__del__
            pass

    switched: list[tuple[str, str]] = []

    async def scenario() -> None:
        g = object.__new__(Generator.func_or_class)
        g.engine, g.board, g.catch_up, g.failed_version = Engine(), Board(), None, None
        g.deployment_id, g.app_name, g.replica, g.version = "dep", "app", "r9", "v-a"
        g.switching = asyncio.Lock()

        async def switch(model: str, version: str) -> dict:
            if version == "v-bad":
                raise RuntimeError("weights do not load")
            switched.append((model, version))
            g.version = version
            return {}

        g.switch = switch
        await g.check_health()
        await g.catch_up
        assert switched == [("/ckpt/b", "v-b")] and g.version == "v-b"
        await g.check_health()  # on the live version: nothing to do
        assert g.catch_up.done() and len(switched) == 1
        g.board.entry = ("/ckpt/bad", "v-bad")
        await g.check_health()
        await g.catch_up
        assert g.failed_version == "v-bad" and g.version == "v-b"
        await g.check_health()  # not retried
        assert g.catch_up.done() and len(switched) == 1
        board = g.board
        board.broken = True
        await g.check_health()  # no raise: the replica stays healthy
        assert g.board is None

    asyncio.run(scenario())


def test_no_private_ray_imports_in_serve():
    """The serve layer stands on Ray's public APIs only (a private module moves between Ray releases)."""
    import re
    from pathlib import Path

    import serve

    root = Path(serve.__file__).parent
    private = re.compile(r"^\s*(from|import)\s+ray(\.\w+)*\._(internal|private)\b", re.M)
    assert private.search("x = 1\n    from ray._private.utils import f\n")  # the pattern finds both kinds
    assert private.search("        from ray.llm._internal.serve.utils.broadcast import broadcast\n")
    assert [f.name for f in sorted(root.glob("*.py")) if private.search(f.read_text())] == []


def test_admin_route_needs_an_admin_key(server, ckpts):
    assert switch(server, ckpts["B"], key=None).status_code == 401
    r = switch(server, ckpts["B"], key=KEY)  # an API key is not an admin key
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_admin_key"
    assert live_version(server).startswith("w-")  # a bare checkpoint folder: the weights' hash


def test_bad_checkpoints_are_refused_and_the_old_version_keeps_serving(server, ckpts):
    import openai

    before = live_version(server)
    for model, status, code in [
        (ckpts["A"].parent / "nowhere", 404, "checkpoint_not_found"),
        ("relative/ckpt", 400, "checkpoint_invalid"),
        (ckpts["C"], 409, "incompatible_checkpoint"),
        (ckpts["D"], 400, "checkpoint_invalid"),
    ]:
        r = switch(server, model)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["param"] == "model" and err["message"]
    assert "num_hidden_layers" in switch(server, ckpts["C"]).json()["error"]["message"]  # names what differs
    assert live_version(server) == before
    c = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    r = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, extra_body={"rag": False}
    )
    assert r.model_extra["model_version"] == before


def test_switch_under_streaming_load_fails_nothing(server, ckpts):
    import openai

    from pipelines.artifacts import manifest_digest

    want = {"A": expected_texts(ckpts["A"]), "B": expected_texts(ckpts["B"])}
    v_a = live_version(server)
    v_b = manifest_digest(str(ckpts["B_artifact"]))[:16]
    results, errors = [], []
    stop = threading.Event()

    def worker(i: int) -> None:
        client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
        k = i
        while not stop.is_set():
            try:
                results.append(stream_one(client, PROMPTS[k % len(PROMPTS)]))
            except Exception as e:  # noqa: BLE001  (every failure is counted, the test asserts there are none)
                errors.append(repr(e))
            k += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    # steady state on A, then on B: enough answers finished wholly before and started wholly after the switch (a
    # count, not a fixed sleep: the same evidence on a fast or a loaded machine)
    wait_for(lambda: len(results) >= STEADY, "answers before the switch", errors)
    t_switch0 = time.perf_counter()
    r = switch(server, ckpts["B_artifact"])  # an artifact folder: its model/ is served
    t_switch1 = time.perf_counter()
    wait_for(lambda: sum(x["start"] > t_switch1 for x in list(results)) >= STEADY, "answers after the switch", errors)
    stop.set()
    for t in threads:
        t.join(timeout=120)

    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == v_b and body["previous_version"] == v_a and body["mode"] == "in_place"
    assert errors == []
    assert all(len(x["versions"]) == 1 for x in results)  # no answer mixes versions
    truncated = [x for x in results if x["finals"] != ["length"] or x["tokens"] != MAX_TOKENS]
    assert truncated == []
    for x in results:
        (v,) = x["versions"]
        assert v in (v_a, v_b)
        assert x["text"] == want["A" if v == v_a else "B"][x["prompt"]], (v, x["prompt"])
    before = [x for x in results if x["end"] < t_switch0]
    after = [x for x in results if x["start"] > t_switch1]
    assert before and after
    assert all(x["versions"] == {v_a} for x in before) and all(x["versions"] == {v_b} for x in after)
    assert live_version(server) == v_b

    steady = [x["end"] - x["start"] for x in before] + [x["end"] - x["start"] for x in after]
    during = [x["end"] - x["start"] for x in results if x["start"] <= t_switch1 and x["end"] >= t_switch0]
    report = {
        "requests": len(results),
        "failed": len(errors),
        "truncated": len(truncated),
        "switch_s": round(t_switch1 - t_switch0, 3),
        "check_s": body["check_s"],
        "drain_s": body["drain_s"],
        "reload_s": body["reload_s"],
        "p99_steady_s": round(p99(steady), 3),
        "p99_during_switch_s": round(p99(during), 3),
        "n_steady": len(steady),
        "n_during": len(during),
    }
    log.warning("version switch under load: %s", json.dumps(report))
    print(f"\nversion switch under load: {json.dumps(report)}")

    # the feedback store recorded which version produced each response
    import openai as _openai

    c = _openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    resp = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "rate me"}], max_tokens=3, extra_body={"rag": False}
    )
    assert resp.model_extra["model_version"] == v_b
    rated = httpx.post(
        server["base"] + "/v1/feedback",
        json={"response_id": resp.id, "rating": "up"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert rated.status_code == 200, rated.text
    from serve.feedback import FeedbackStore

    assert FeedbackStore(server["state"] / "feedback.db").response(resp.id)["model_version"] == v_b


def test_genloop_deploy_over_http_and_over_ray(server, ckpts, capsys):
    import ray

    from cluster.commands.deploy import run

    v_b = live_version(server)
    args = argparse.Namespace(
        model=str(ckpts["A"]),
        url=server["base"],
        admin_key=None,
        admin_key_file=None,
        app_name=server["app"],
        timeout=300.0,
    )
    with pytest.raises(ValueError, match="401"):  # no admin key
        run(args)
    args.admin_key = ADMIN
    assert run(args) == 0
    v_a = live_version(server)
    assert v_a != v_b and v_a.startswith("w-")
    assert f"as version {v_a}" in capsys.readouterr().out
    # through the Ray cluster the app runs on (no admin key: holding the cluster is holding the server)
    ray_args = argparse.Namespace(
        model=str(ckpts["B"]),
        url=None,
        admin_key=None,
        admin_key_file=None,
        app_name=server["app"],
        timeout=300.0,
        address=ray.get_runtime_context().gcs_address,
    )
    assert run(ray_args) == 0
    assert live_version(server) == v_b
    ray_args.model = str(ckpts["C"])
    with pytest.raises(ValueError, match="409"):
        run(ray_args)
    assert live_version(server) == v_b


def test_a_replica_started_after_a_switch_serves_the_live_version(server, ckpts):
    """Ray Serve replaces a dead generator replica (as it adds one when autoscaling): the new replica loads the
    checkpoint a switch made live, not the one the application was deployed with."""
    import openai
    import ray

    v_live = live_version(server)
    assert v_live != live_version_of_a(ckpts)  # the previous test left B live
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{server['app']}#Generator#")
    ]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)
    c = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
    deadline = time.time() + 300
    while True:  # requests fail while no generator replica is up; wait for the new one
        try:
            r = c.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                extra_body={"rag": False, "ignore_eos": True},
            )
            break
        except openai.APIError:
            assert time.time() < deadline, "no generator replica came back"
            time.sleep(2)
    assert r.model_extra["model_version"] == v_live == live_version(server)
    assert r.choices[0].message.content == expected_texts(ckpts["B"])[PROMPTS[0]]


def live_version_of_a(ckpts) -> str:
    from serve.versions import model_version

    return model_version(str(ckpts["A"]))
