"""Write Qwen-Image components as a diffusers pipeline folder (safetensors), atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

T2I_KEYS = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")


def save_components(components: dict[str, Any], out_dir: str | Path,
                    write_transformer: Callable[[Path], None] | None = None) -> Path:
    """Save components as a pipeline folder that both `QwenImagePipeline` and, when a
    `processor` is among them, `QwenImageEditPipeline` load with `from_pretrained(out_dir)`.

    `write_transformer(folder)`, when given, writes the transformer subfolder itself (config.json
    + safetensors; e.g. `weights.write_transformer` streaming a partitioned engine) instead of
    diffusers' `save_pretrained` of an in-memory model; `components["transformer"]` is ignored.

    With a processor the folder is written as a `QwenImageEditPipeline` (the T2I pipeline
    ignores the extra `processor` entry). The folder is written beside `out_dir` and moved into
    place at the end, so a crash never leaves a half-written pipeline; an existing `out_dir` is
    replaced.
    """
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    if write_transformer is not None:
        components = {**components, "transformer": None}
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if components.get("processor") is not None:
        pipe = QwenImageEditPipeline(**{k: components[k] for k in (*T2I_KEYS, "processor")})
    else:
        pipe = QwenImagePipeline(**{k: components[k] for k in T2I_KEYS})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if write_transformer is None:
            pipe.save_pretrained(tmp, safe_serialization=True)
        else:
            from diffusers.utils import logging as diffusers_logging

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # "transformer=None cannot be saved": intended
            try:
                pipe.save_pretrained(tmp, safe_serialization=True)
            finally:
                diffusers_logging.set_verbosity(level)
        if write_transformer is not None:
            write_transformer(tmp / "transformer")
            _register_transformer(tmp)
        _drop_source_paths(tmp)
        tmp.chmod(0o755)  # mkdtemp makes 0700; a pipeline folder is readable like any output
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _register_transformer(folder: Path) -> None:
    """Point model_index.json's `transformer` entry (None when the pipeline was saved without
    one) at the class named in the written transformer/config.json."""
    import json

    cls = json.loads((folder / "transformer" / "config.json").read_text())["_class_name"]
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = ["diffusers", cls]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _drop_source_paths(folder: Path) -> None:
    """Remove the `_name_or_path` / `name_or_path` entries diffusers and transformers write into
    configs of models loaded from a folder: they leak local paths into exported pipelines and
    make identical components differ byte-wise."""
    import json

    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and ({"_name_or_path", "name_or_path"} & data.keys()):
            data.pop("_name_or_path", None)
            data.pop("name_or_path", None)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
