"""ray-cluster.yaml passes Ray's own cluster-config validation (no cloud call); the local fake multi-node config
mirrors it; the per-stage resource table points at node types that exist in both."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from cluster.autoscale import FAKE_CONFIG, load_fake_config, worker_node_types
from pipelines import resources

ROOT = Path(__file__).resolve().parent.parent
CLOUD = ROOT / "ray-cluster.yaml"


def cloud_config() -> dict:
    return yaml.safe_load(CLOUD.read_text())


def ray_validate(cfg: dict) -> dict:
    """Ray's own checks: the JSON schema on the file as written, then again on the config with the provider's
    defaults filled in (what `ray up` does before it touches the cloud)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(cfg))
    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    return full


def test_ray_cluster_yaml_passes_rays_validation():
    full = ray_validate(cloud_config())
    types = full["available_node_types"]
    assert full["head_node_type"] == "head" and set(types) == {"head", "cpu-worker", "gpu-1x", "gpu-8x"}
    assert full["provider"]["type"] == "aws"


@pytest.mark.parametrize("breakage", ["no_head_type", "bad_max_workers", "negative_resource", "unknown_key"])
def test_validation_rejects_broken_configs(breakage):
    """The validation used above is not a no-op: each of these edits makes it fail."""
    import jsonschema

    cfg = cloud_config()
    if breakage == "no_head_type":
        del cfg["head_node_type"]
    elif breakage == "bad_max_workers":
        cfg["available_node_types"]["gpu-1x"]["max_workers"] = "four"
    elif breakage == "negative_resource":
        cfg["available_node_types"]["head"]["resources"] = {"CPU": -1}
    else:
        cfg["idle_timeout_minute"] = 5
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(cfg)


def test_cloud_cluster_shape():
    cfg = cloud_config()
    types = cfg["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}, "the head runs no stage work"
    for name in ("cpu-worker", "gpu-1x", "gpu-8x"):
        t = types[name]
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
        assert t["labels"]["genloop.io/node-type"] == name
    assert cfg["max_workers"] == sum(types[n]["max_workers"] for n in ("cpu-worker", "gpu-1x", "gpu-8x"))
    assert 0 < cfg["idle_timeout_minutes"] <= 30
    setup = "\n".join(cfg["setup_commands"])
    assert "cd ~/genloop && make setup" in setup, "nodes install genloop exactly as `make setup` does"
    assert "GENLOOP_BUCKET" in setup and "mount-s3 --read-only" in setup
    assert cfg["file_mounts"]["~/genloop"] == "." and "~/.ray/auth_token" in cfg["file_mounts"]
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = [c for c in cmds if " start " in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), "token authentication on every node"
    head_start = next(c for c in cfg["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start, "dashboard / job server on loopback only"
    assert "--num-cpus=0" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_editing_the_marked_lines_is_enough_to_retarget_the_cluster():
    """The README says: edit the lines marked EDIT (region, the four instance types, the bucket). Editing just
    those values gives a config Ray validates, with the new region / types / bucket everywhere they are used."""
    lines = CLOUD.read_text().splitlines()
    marked = [i for i, ln in enumerate(lines) if "# EDIT:" in ln]
    new_values = {
        "region": "eu-central-1",
        "InstanceType": iter(["c7i.2xlarge", "c7i.8xlarge", "g6.2xlarge", "p5.48xlarge"]),
    }
    old_values = []
    for i in marked:
        code, _, comment = lines[i].partition("#")
        if "GENLOOP_BUCKET=" in code:
            old_values.append(code.split("GENLOOP_BUCKET=")[1].split("'")[0])
            code = code.replace(old_values[-1], "other-bucket")
        else:
            key, _, value = code.partition(":")
            old_values.append(value.strip())
            nv = new_values[key.strip()]
            code = f"{key}: {nv if isinstance(nv, str) else next(nv)}  "
        lines[i] = code + "#" + comment
    text = "\n".join(lines)
    for old in old_values:  # no default value is repeated outside its marked line
        assert old not in text, f"{old!r} also appears outside the line marked EDIT"
    cfg = yaml.safe_load(text)
    full = ray_validate(cfg)
    assert full["provider"]["region"] == "eu-central-1"
    types = {k: v["node_config"]["InstanceType"] for k, v in full["available_node_types"].items()}
    assert types == {
        "head": "c7i.2xlarge",
        "cpu-worker": "c7i.8xlarge",
        "gpu-1x": "g6.2xlarge",
        "gpu-8x": "p5.48xlarge",
    }
    setup = "\n".join(cfg["setup_commands"])
    assert "GENLOOP_BUCKET=other-bucket" in setup and "mount-s3 --read-only $GENLOOP_BUCKET" in setup


def test_fake_multinode_config_mirrors_the_cloud_one():
    fake, cloud = load_fake_config(), cloud_config()
    ray_validate(fake)
    assert fake["provider"]["module"].endswith("FakeMultiNodeProvider")
    fake_workers = worker_node_types(fake)
    cloud_workers = {k: v for k, v in cloud["available_node_types"].items() if k != cloud["head_node_type"]}
    assert set(fake_workers) == set(cloud_workers)
    for name, t in fake_workers.items():
        assert t["labels"] == cloud_workers[name]["labels"]
        assert t["min_workers"] == 0 and 1 <= t["max_workers"] <= cloud_workers[name]["max_workers"]
    # same GPU counts as the instance types named in ray-cluster.yaml (g5.2xlarge: 1, p4d.24xlarge: 8)
    assert fake_workers["cpu-worker"]["resources"].get("GPU", 0) == 0
    assert fake_workers["gpu-1x"]["resources"]["GPU"] == 1 and fake_workers["gpu-8x"]["resources"]["GPU"] == 8
    assert fake["available_node_types"][fake["head_node_type"]]["resources"] == {"CPU": 0}
    assert fake["idle_timeout_minutes"] < 1, "scale-down must be visible within the test"
    assert load_fake_config(FAKE_CONFIG, idle_timeout_minutes=0.5)["idle_timeout_minutes"] == 0.5


def test_every_resource_ask_fits_its_node_type():
    fake = worker_node_types(load_fake_config())
    cloud = cloud_config()["available_node_types"]
    for unit, a in resources.ASKS.items():
        assert a.node_type in cloud and a.node_type in fake, unit
        node = fake[a.node_type]["resources"]
        assert a.cpus <= node["CPU"] and a.gpus <= node.get("GPU", 0), f"{unit} does not fit {a.node_type}"
    # data work never needs a GPU node; every model-running unit asks for one GPU
    assert resources.ask("data_task").gpus == 0 and fake["cpu-worker"]["resources"].get("GPU", 0) == 0
    for unit in ("train_worker", "sft_worker", "rollout_engine", "serve_replica"):
        assert resources.ask(unit).gpus == 1
    # the three spellings carry the same ask; a CPU-only cluster drops the GPU and keeps the CPUs
    for unit, a in resources.ASKS.items():
        assert resources.ray_options(unit) == {"num_cpus": a.cpus, "num_gpus": a.gpus}
        assert resources.ray_options(unit, use_gpu=False) == {"num_cpus": a.cpus, "num_gpus": 0.0}
        per_worker = resources.resources_per_worker(unit)
        assert per_worker["CPU"] == a.cpus and per_worker.get("GPU", 0) == a.gpus
        assert ("GPU" in per_worker) == (a.gpus > 0), "no zero GPU key for Ray Train"
        assert "GPU" not in resources.resources_per_worker(unit, use_gpu=False)
    with pytest.raises(ValueError, match="unknown resource unit 'gpu_task'"):
        resources.ask("gpu_task")
    assert "serve_replica" in resources.table()


def readme_cluster_commands() -> list[list[str]]:
    """Every command line in the README's "Run on a cluster" code blocks, split like a shell would."""
    import shlex

    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Run on a cluster\n", 1)[1].split("\n## ", 1)[0]
    lines, in_code = [], False
    for raw in section.splitlines():
        if raw.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            lines.append(raw)
    joined = "\n".join(lines).replace("\\\n", " ")
    cmds = []
    for line in joined.splitlines():
        line = re.sub(r"\s{2,}# .*$", "", line).strip()
        if line and not line.startswith("#"):
            cmds.append(shlex.split(line.replace("$GENLOOP_BUCKET", "my-genloop-bucket")))
    return cmds


def test_every_readme_cluster_command_is_valid():
    """genloop commands parse with the real parsers (submit: the stage's own parser); ray commands exist with the
    options used (Ray's click CLI)."""
    from ray.scripts.scripts import cli as ray_cli

    from cluster import jobs
    from cluster.cli import build_parser

    cmds = readme_cluster_commands()
    seen = {c[0] for c in cmds}
    assert seen <= {"genloop", "ray", "export", ".", "curl"}, seen
    ray_subcommands = set()
    for c in cmds:
        if c[0] == "genloop" and c[1] == "submit":
            argv, own = jobs.split_submit_args(c[2:])
            jobs.validate_stage_args(argv)  # raises on a bad stage / option / preset
        elif c[0] == "genloop":
            build_parser(c[1]).parse_args(c[1:])
        elif c[0] == "ray":
            cmd = ray_cli.commands[c[1]]
            opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
            used = {t for t in c[2:] if t.startswith("-")}
            assert used <= opts, (c, used - opts)
            ray_subcommands.add(c[1])
    assert ray_subcommands == {"get-auth-token", "up", "dashboard", "attach", "exec", "down"}
    stages = [c[2] for c in cmds if c[:2] == ["genloop", "submit"]]
    assert stages == ["data", "pretrain", "sft-data", "sft", "serve"]


CLUSTER_PRESETS = ("gpt2-124m", "llama-1b", "llama-8b")


@pytest.mark.parametrize("preset", CLUSTER_PRESETS)
def test_cluster_presets_keep_serving_stores_on_a_writable_local_disk(preset):
    """The bucket is mounted read-only at /mnt/genloop: SQLite stores there cannot be written. The presets' stores
    (knowledge, and memory / feedback beside it) and the API key file live in a folder ray-cluster.yaml creates and
    hands to the node's user on every node (the key file on the head, where the serve job's driver reads it)."""
    from pipelines.config import build_config
    from serve.config import ServeConfig

    cfg = build_config(ServeConfig, "serve", preset)
    cloud = cloud_config()
    setup = "\n".join(cloud["setup_commands"])
    mount = re.search(r"mount-s3 --read-only \S+ (\S+?)\)", setup).group(1)
    made = re.search(r"sudo mkdir -p (\S+) && sudo chown -R \$USER (\S+)", setup)
    assert made, "ray-cluster.yaml makes a writable local folder for the serving stores on every node"
    for path in cfg.state_paths():
        assert not path.startswith(mount + "/"), f"{preset}: {path} is on the read-only bucket mount {mount}"
        assert path.startswith(made.group(1)) and path.startswith(made.group(2)), (preset, path)
    assert cfg.api_key_file and not cfg.api_key_file.startswith(mount + "/")
    head = "\n".join(cloud["head_setup_commands"])
    assert f"> {cfg.api_key_file}" in head, "the head writes the key file the presets name"


def test_readme_cluster_curl_sends_the_api_key_the_presets_require():
    from pipelines.config import build_config
    from serve.config import ServeConfig

    assert all(build_config(ServeConfig, "serve", p).api_key_file for p in CLUSTER_PRESETS)
    curl = next(c for c in readme_cluster_commands() if c[0] == "curl")
    headers = [curl[i + 1] for i, w in enumerate(curl) if w == "-H"]
    assert "Authorization: Bearer $GENLOOP_API_KEY" in headers, curl
    exported = [c for c in readme_cluster_commands() if c[0] == "export" and "GENLOOP_API_KEY=" in " ".join(c)]
    assert exported, "the README says where the key comes from"
    key_file = build_config(ServeConfig, "serve", "llama-1b").api_key_file
    assert any(c[:2] == ["ray", "exec"] and key_file in " ".join(c) for c in readme_cluster_commands())
