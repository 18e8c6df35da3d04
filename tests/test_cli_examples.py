"""Every example a user reads runs as written: each `genloop ...` line and each `key=value` override in README.md,
in every command's --help text and in the demo's steps parses with the real parser and builds the stage's typed
config. A wrong key, a wrong type or a removed option in any of them fails here."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.commands import BY_NAME, COMMANDS
from cluster.commands.base import config_from_args  # noqa: F401  (the helper every stage command's config() uses)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# an override as written in docs: dotted lower-case key = value (make's FOO=bar and model.KEY=VALUE are not)
KV = re.compile(r"^(?!key=value$)[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*=\S+$")  # `key=value` itself: the placeholder
ENV = {"$GENLOOP_BUCKET": "my-genloop-bucket"}


def _clean(tok: str) -> str:
    return tok.rstrip(").,;:")


def _split(line: str) -> list[str]:
    """Shell words of an example; in prose ("... (from genloop feedback export), or ...") it ends at the first word
    that closes a clause."""
    for k, v in ENV.items():
        line = line.replace(k, v)
    words = shlex.split(line)
    for i, w in enumerate(words):
        if w.endswith((")", ",", ";")) and "(" not in w:
            return words[:i] + [w.rstrip("),;")]
    return words


def readme_text() -> str:
    return README.read_text()


def readme_command_lines(text: str) -> list[str]:
    """`genloop ...` lines of the fenced bash blocks (continuations joined, trailing comments dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("genloop "):
                lines.append(line)
    return lines


def readme_inline_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", prose)


def help_texts(parser: argparse.ArgumentParser) -> list[str]:
    """The raw (unwrapped) description, epilog and option help strings of a parser and its sub-parsers."""
    out = [parser.description or "", parser.epilog or ""]
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            out.append(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias maps to the same parser
                out += help_texts(sub)
    return out


def commands_in(text: str) -> list[str]:
    """`genloop COMMAND ...` examples in a help text: up to a backtick or the end of the line."""
    text = text.replace("\\\n", " ")
    return [m.strip() for m in re.findall(r"genloop [^`\n]+", text)]


def stray_overrides(text: str) -> list[str]:
    """key=value tokens of a text that are not part of a `genloop ...` example in it."""
    for cmd in commands_in(text):
        text = text.replace(cmd, " ")
    return [_clean(t) for t in text.split() if KV.match(_clean(t))]


def stage_commands() -> list[str]:
    return [c.name for c in COMMANDS if hasattr(c.load(), "config")]


def build(argv: list[str]):
    """Parse ``genloop argv`` with the real parser and build the stage's config (None for a command without one).
    ``genloop submit X ...`` checks ``X ...`` the way submit itself does."""
    from cluster import jobs

    if "--help" in argv or "-h" in argv:  # `genloop X --help`: X must exist; nothing to build
        assert argv[0] in BY_NAME, f"unknown command {argv[0]!r} in an example"
        return None
    if len(argv) <= 2 and not any(w.startswith("-") or "=" in w for w in argv):
        # a reference to a command in prose ("from genloop feedback export"): the command and action must exist
        assert argv[0] in BY_NAME, f"unknown command {argv[0]!r} in an example"
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                build_parser(argv[0]).parse_args([*argv, "--help"])
            except SystemExit as e:
                assert e.code == 0, f"`genloop {' '.join(argv)}` names no command"
        return None
    if argv[0] == "submit":
        argv, _ = jobs.split_submit_args(argv[1:])
        if not argv:  # prose naming `genloop submit` itself
            return None
    name = argv[0]
    assert name in BY_NAME, f"unknown command {name!r} in an example"
    args = build_parser(name).parse_args(argv)
    module = BY_NAME[name].load()
    cfg = module.config(args) if hasattr(module, "config") else None
    from pipelines.pretrain.config import PretrainConfig, model_config

    if isinstance(cfg, PretrainConfig):  # the architecture the overrides describe must be buildable too
        model_config(cfg, n_vocab=1024, seq_len=64).validate()
    return cfg


def build_overrides(name: str, overrides: list[str]):
    return build([name, *overrides])


def accepted_by_some_stage(overrides: list[str]) -> list[str]:
    ok = []
    for name in stage_commands():
        try:
            build_overrides(name, overrides)
            ok.append(name)
        except (ValueError, SystemExit):
            pass
    return ok


def is_placeholder(argv: list[str]) -> bool:
    return argv[0].isupper()  # genloop COMMAND --help


# ---- README -----------------------------------------------------------------------------------------------------


def test_every_readme_genloop_line_builds_its_config():
    lines = readme_command_lines(readme_text())
    assert len(lines) >= 15, "the README's command examples were not found"
    built = 0
    for line in lines:
        argv = _split(line)[1:]
        if not argv or argv[0].startswith("-") or is_placeholder(argv):
            continue
        try:
            cfg = build(argv)
        except SystemExit as e:
            pytest.fail(f"README example does not parse: {line!r} (exit {e.code})")
        built += cfg is not None
    assert built >= 10


def test_every_readme_override_example_builds_a_stage_config():
    spans = readme_inline_spans(readme_text())
    checked = 0
    for span in spans:
        if span.startswith("genloop "):
            argv = _split(span)[1:]
            if argv and not is_placeholder(argv) and not argv[0].startswith("-"):
                build(argv)
            continue
        kvs = [t for t in span.split() if KV.match(t)]
        if not kvs or span.split()[0] in ("make", "curl"):
            continue
        assert accepted_by_some_stage(kvs), f"README override example `{span}` is accepted by no stage's config"
        checked += 1
    assert checked >= 2, "the README's key=value examples were not found"


def test_readme_promises_model_dim_and_train_lr():
    """The two overrides the README and --help teach (issue 12) build pretrain's config with those values."""
    cfg = build_overrides("pretrain", ["--config", "tiny", "model.dim=128", "train.lr=3e-4"])
    assert cfg.model.dim == 128 and cfg.train.lr == 3e-4 and cfg.model.preset == "tiny"
    assert "train.lr=3e-4" in readme_text() and "model.dim=128" in readme_text()


def readme_config_commands() -> list[tuple[str, list[str]]]:
    """(preset, argv) of every README `genloop ... --config PRESET` line; `genloop submit X ...`: X's argv."""
    from cluster import jobs

    out = []
    for line in readme_command_lines(readme_text()):
        argv = _split(line)[1:]
        if argv and argv[0] == "submit":
            argv, _ = jobs.split_submit_args(argv[1:])
        if "--config" in argv:
            out.append((argv[argv.index("--config") + 1], argv))
    return out


def test_every_readme_config_command_finds_its_sections_in_the_preset():
    """Each README command with --config runs its config through the loader, which refuses a preset that lacks the
    command's section (no silent defaults): a stage reads its own section; `plan` reads pretrain: and data: (its
    own plan: section is optional)."""
    from pipelines.config import build_config, load_yaml

    cmds = readme_config_commands()
    seen = set()
    for preset, argv in cmds:
        name = argv[0]
        if name == "plan":
            from pipelines.data.config import DataConfig
            from pipelines.pretrain.plan import PlanConfig, run_shape

            build_config(PlanConfig, "plan", preset)
            shape = run_shape(preset, {}, build_config(DataConfig, "data", preset))
            assert shape.num_workers > 1, f"{preset}: plan sizes a multi-GPU run"
            sections = ["pretrain", "data"]
        else:
            cfg = build(argv)
            assert cfg is not None, f"`genloop {' '.join(argv)}` builds no stage config"
            if name == "rlhf":  # the preset's reward / group filter and the line's flags fit together
                cfg.validate()
            sections = [name]
        for section in sections:
            assert section in load_yaml(preset), f"README: `genloop {name} --config {preset}` needs {section}:"
            seen.add((preset, section))
    assert {
        ("demo", "sft"),
        ("llama-1b", "sft"),
        ("llama-1b", "sft-data"),
        ("llama-1b", "serve"),
        ("llama-8b", "pretrain"),
        ("domain", "pretrain"),
        ("smollm2", "serve"),
        ("smollm2", "sft-data"),
        ("smollm2", "sft"),
        ("smollm2", "rlhf"),
        ("smollm2", "pref-data"),
        ("smollm2", "dpo"),
    } <= seen, sorted(seen)


def test_smollm2_preset_sizes_every_stage_for_a_small_cpu():
    """configs/smollm2.yaml (the README's real-model commands): every stage's section, each capped well below the
    model's 8,192 positions (0 would mean all of them), one CPU worker, a pretrained model's small learning rates."""
    from pipelines.config import build_config, load_yaml
    from pipelines.prefs.dpo import DpoConfig
    from pipelines.prefs.pref_data import PrefDataConfig
    from pipelines.prefs.reward import RewardConfig
    from pipelines.rlhf.config import RlhfConfig
    from pipelines.sft.stage import SftConfig
    from serve.config import ServeConfig

    assert {"serve", "sft-data", "sft", "reward", "dpo", "pref-data", "rlhf"} <= set(load_yaml("smollm2"))
    for cls, section in ((SftConfig, "sft"), (RewardConfig, "reward"), (DpoConfig, "dpo")):
        cfg = build_config(cls, section, "smollm2")
        assert 0 < cfg.seq_len <= 512 and cfg.train.global_rows() == 16, (section, cfg)
        assert cfg.train.num_workers == 1 and not cfg.train.use_gpu and cfg.train.lr <= 2e-5, (section, cfg.train)
        cfg.train.validate()
    rlhf = build_config(RlhfConfig, "rlhf", "smollm2")
    assert rlhf.train.lr <= 2e-5 and rlhf.rollout.engine.max_model_len and rlhf.reward.startswith("fn:")
    assert build_config(PrefDataConfig, "pref-data", "smollm2").engine.max_model_len
    assert 0 < build_config(ServeConfig, "serve", "smollm2").engine.max_model_len <= 4096


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-1b", "llama-8b"])
def test_cluster_presets_size_every_training_stage_for_gpus(preset):
    """A cluster preset trains every stage on several GPU workers (not the defaults: 1 worker, CPU-sized)."""
    from pipelines.config import build_config
    from pipelines.prefs.dpo import DpoConfig
    from pipelines.prefs.reward import RewardConfig
    from pipelines.pretrain.config import PretrainConfig
    from pipelines.rlhf.config import RlhfConfig
    from pipelines.sft.stage import SftConfig

    for cls, section in (
        (PretrainConfig, "pretrain"),
        (SftConfig, "sft"),
        (RewardConfig, "reward"),
        (DpoConfig, "dpo"),
        (RlhfConfig, "rlhf"),
    ):
        train = build_config(cls, section, preset).train
        assert train.use_gpu is True and train.num_workers >= 4, (preset, section, train)
    assert build_config(SftConfig, "sft", preset).seq_len >= 1024


# ---- --help -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_every_help_example_builds_its_config(name):
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    module = BY_NAME[name].load()
    texts = help_texts(sub)
    for text in texts:
        for cmd in commands_in(text):
            argv = _split(cmd)[1:]
            if argv and not is_placeholder(argv) and not argv[0].startswith("-"):
                try:
                    build(argv)
                except SystemExit as e:
                    pytest.fail(f"`genloop {name} --help` example does not parse: {cmd!r} (exit {e.code})")
    strays = [kv for text in texts for kv in stray_overrides(text)]
    if hasattr(module, "config"):
        assert strays, f"`genloop {name} --help` shows no key=value example"
        build_overrides(name, strays)  # all of them together, on this command's own config
    else:
        for kv in strays:
            assert accepted_by_some_stage([kv]), f"`genloop {name} --help` example {kv} is accepted by no stage"


def test_top_level_help_examples_build_a_stage_config():
    parser = build_parser(None)
    strays = [kv for text in help_texts(parser) for kv in stray_overrides(text)]
    assert "train.lr=3e-4" in strays and "model.dim=128" in strays
    assert "pretrain" in accepted_by_some_stage(strays)


def test_a_wrong_example_is_caught():
    """The checks above can fail: a key the stage lacks, a bad type, an unknown option."""
    with pytest.raises(ValueError, match="did you mean train.lr"):
        build_overrides("pretrain", ["lr=3e-4"])
    with pytest.raises(ValueError, match="must be an integer"):
        build_overrides("pretrain", ["model.dim=wide"])
    assert accepted_by_some_stage(["model.dim=128", "lora.rank=8"]) == []
    assert accepted_by_some_stage(["lr=3e-4"]) == []  # the old README example
    with pytest.raises(SystemExit):
        build(["sft", "--no-such-option", "x"])
    with pytest.raises(AssertionError, match="names no command"):
        build(["feedback", "exprot"])
    assert stray_overrides("e.g. train.lr=3e-4 model.dim=128)") == ["train.lr=3e-4", "model.dim=128"]


# ---- the demo -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["demo", "tiny"])
def test_every_demo_step_builds_its_config(tmp_path, preset):
    from cluster.demo import steps

    for step in steps(tmp_path, preset):
        build(step.argv())
