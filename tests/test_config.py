from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from pipelines.config import ConfigError, apply_overrides, build_config, from_dict, parse_override, preset_path


@dataclass
class Inner:
    dim: int = 8
    name: str = "x"


@dataclass
class Outer:
    lr: float = 1e-3
    steps: int = 10
    strategy: Literal["ddp", "fsdp"] = "ddp"
    inputs: list[str] = field(default_factory=list)
    flag: bool = False
    model: Inner = field(default_factory=Inner)
    init_from: str | None = None


def test_overrides_are_typed_and_nested():
    cfg = from_dict(Outer, apply_overrides({}, ["lr=3e-4", "steps=5", "model.dim=64", "inputs=[a,b]", "flag=true"]))
    assert cfg.lr == 3e-4 and cfg.steps == 5 and cfg.model.dim == 64 and cfg.model.name == "x"
    assert cfg.inputs == ["a", "b"] and cfg.flag is True and cfg.init_from is None


def test_unknown_key_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'stpes'.*steps"):
        from_dict(Outer, {"stpes": 3})
    with pytest.raises(ConfigError, match=r"model\.dimm"):
        from_dict(Outer, {"model": {"dimm": 3}})


@pytest.mark.parametrize(
    "data,msg",
    [
        ({"steps": "ten"}, "steps.*integer"),
        ({"lr": "fast"}, "lr.*number"),
        ({"strategy": "zero3"}, "strategy.*one of"),
        ({"flag": "maybe"}, "flag.*true or false"),
        ({"model": 3}, "model.*mapping"),
    ],
)
def test_wrong_types_are_clear_errors(data, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict(Outer, data)


def test_override_needs_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("lr")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        preset_path("huge")


def test_preset_section_then_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  lr: 0.5\n  steps: 7\nother:\n  junk: 1\n")
    cfg = build_config(Outer, "train", str(f), ["steps=9"])
    assert cfg.lr == 0.5 and cfg.steps == 9
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(Outer, "train", str(f))


@dataclass
class Arch:
    SHORTHAND: ClassVar[str] = "preset"

    preset: str = "small"
    dim: int | None = None


@dataclass
class WithShorthand:
    model: Arch = field(default_factory=Arch)
    train: Inner = field(default_factory=Inner)


def test_shorthand_value_stands_for_the_sections_preset_and_survives_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("stage:\n  model: big\n")
    cfg = build_config(WithShorthand, "stage", str(f), ["model.dim=128"])
    assert cfg.model == Arch(preset="big", dim=128)  # the preset's `model: big` is kept, dim set on top
    cfg = build_config(WithShorthand, "stage", str(f), ["model.dim=128", "model=huge"])
    assert cfg.model == Arch(preset="huge", dim=128)  # a later shorthand sets the preset, keeps the fields
    assert from_dict(WithShorthand, {"model": "x"}).model == Arch(preset="x")
    with pytest.raises(ConfigError, match="train.*mapping"):
        from_dict(WithShorthand, {"train": "x"})  # no SHORTHAND: a plain value is still an error


def test_unknown_key_that_lives_in_a_section_suggests_the_dotted_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'dim'.*did you mean model.dim or train.dim\?"):
        from_dict(WithShorthand, {"dim": 3})
    with pytest.raises(ConfigError) as e:
        from_dict(WithShorthand, {"colour": 3})
    assert "did you mean" not in str(e.value)


# ---- a missing section is an error, never a silent run on the defaults --------------------------------------------


def test_missing_section_names_the_file_the_section_and_the_sections_it_has(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("data:\n  seq_len: 64\npretrain:\n  steps: 3\n")
    with pytest.raises(ConfigError) as e:
        build_config(Outer, "sft", str(f))
    msg = str(e.value)
    assert msg.startswith(f"{f} has no 'sft:' section (its sections: data:, pretrain:); add a 'sft:' section")
    assert "presets with one: demo, " in msg and "tiny" in msg, "it says which shipped presets have the section"
    f.write_text("")
    with pytest.raises(ConfigError, match=r"has no 'sft:' section \(its sections: none\)"):
        build_config(Outer, "sft", str(f))


def test_a_shipped_preset_without_the_section_is_an_error_too():
    """A shipped preset without the stage's section fails the same way (domain has only data: and pretrain:)."""
    with pytest.raises(
        ConfigError,
        match=r"configs/domain\.yaml has no 'rlhf:' section \(its sections: data:, "
        r"pretrain:\)",
    ):
        build_config(Outer, "rlhf", "domain")


def test_empty_flat_optional_sections(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\nother:\n  junk: 1\n")
    assert build_config(Outer, "train", str(f)) == Outer(), "an empty `train:` takes every default, on purpose"
    f.write_text("lr: 0.5\nsteps: 7\n")  # a flat file that is the stage's config whole
    assert build_config(Outer, "train", str(f)).steps == 7
    f.write_text("lr: 0.5\nunknown: 7\n")  # not a flat config (a key it lacks) and no section: an error
    with pytest.raises(ConfigError, match="has no 'train:' section"):
        build_config(Outer, "train", str(f))
    f.write_text("train: 3\n")
    with pytest.raises(ConfigError, match=r"section 'train:' must be a mapping"):
        build_config(Outer, "train", str(f))
    f.write_text("data:\n  seq_len: 64\n")
    assert build_config(Outer, "train", str(f), required=False) == Outer(), "an explicitly optional section"
    assert build_config(Outer, "plan", str(f)).steps == 10, "plan: is optional (OPTIONAL_SECTIONS)"
    assert build_config(Outer, "train", None, ["steps=4"]).steps == 4, "no --config: defaults and overrides"


def test_a_preset_with_only_another_stages_section_is_not_taken_for_a_flat_config(tmp_path):
    @dataclass
    class WithData:
        data: str = ""
        model: Inner = field(default_factory=Inner)

    f = tmp_path / "p.yaml"
    f.write_text("data:\n  seq_len: 64\n")  # a `data:` stage section, not WithData's data path
    with pytest.raises(ConfigError, match=r"has no 'sft:' section \(its sections: data:\)"):
        build_config(WithData, "sft", str(f))
    f.write_text("data: corpus/\nmodel:\n  dim: 4\n")  # a flat config for WithData: used whole
    assert build_config(WithData, "sft", str(f)) == WithData(data="corpus/", model=Inner(dim=4))
