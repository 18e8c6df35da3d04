"""A real pretrained model for the benches (``--model smollm2`` or ``--model PATH``): the folder of an imported model,
importing the packaged SmolLM2-135M-Instruct once (``genloop import-model``) when none is given."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGED = {"smollm2": "smollm2-135m-instruct"}  # --model NAME -> the model `genloop import-model` knows by name


def resolve_model(spec: str) -> Path:
    """The Hugging Face folder for ``spec``: a checkpoint or artifact folder as given; a packaged name
    (``smollm2``): ``runs/smollm2`` when the README's import is there, else an import cached under
    ``$GENLOOP_CACHE_DIR`` (default ``~/.cache/genloop``)/models/NAME, made on first use (~30 s)."""
    from pipelines.artifacts import checkpoint_dir

    if spec not in PACKAGED:
        if not Path(spec).exists():
            raise SystemExit(
                f"--model {spec}: no such folder; pass an imported model folder or one of {list(PACKAGED)}"
            )
        return Path(checkpoint_dir(spec))
    readme = Path("runs") / spec
    if (readme / "model" / "config.json").is_file():
        return readme / "model"
    cache = Path(os.environ.get("GENLOOP_CACHE_DIR", Path.home() / ".cache" / "genloop")) / "models" / spec
    if not (cache / "model" / "config.json").is_file():
        from cluster.cli import main as genloop

        print(f"importing {PACKAGED[spec]} into {cache} (once)", flush=True)
        if genloop(["import-model", PACKAGED[spec], "--out", str(cache), "--overwrite"]) != 0:
            raise SystemExit(f"genloop import-model {PACKAGED[spec]} failed")
    return cache / "model"


def is_real_model(spec: str) -> bool:
    """``spec`` names a real model (a packaged name or a folder), not a genloop model preset."""
    return spec in PACKAGED or os.sep in spec or Path(spec).is_dir()
