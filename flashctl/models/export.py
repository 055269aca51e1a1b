"""Write Qwen-Image components as a diffusers pipeline folder (safetensors), atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

T2I_KEYS = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")


def save_components(components: dict[str, Any], out_dir: str | Path,
                    write_transformer: Callable[[Path], None] | None = None,
                    pipeline_class: str | None = None, copy_from: str | Path | None = None) -> Path:
    """Save components as a pipeline folder that both `QwenImagePipeline` and, when a
    `processor` is among them, `QwenImageEditPipeline` load with `from_pretrained(out_dir)`.

    `pipeline_class` (e.g. the adapter's `family`: "QwenImageEditPlusPipeline") is the class
    model_index.json names, so `DiffusionPipeline.from_pretrained` conditions edits the way the
    model was trained; default: QwenImageEditPipeline with a processor, else QwenImagePipeline.
    `copy_from` (a pipeline folder): the `text_encoder` / `vae` components given as None are
    copied from its subfolders file by file instead of being saved from memory -- the export
    of a run trained from cached conditioning never builds a 7B text encoder just to write it.

    `write_transformer(folder)`, when given, writes the transformer subfolder itself (config.json
    + safetensors; e.g. `weights.write_transformer` streaming a partitioned engine) instead of
    diffusers' `save_pretrained` of an in-memory model; `components["transformer"]` is ignored.

    With a processor the folder is written as a `QwenImageEditPipeline` (the T2I pipeline
    ignores the extra `processor` entry). The folder is written beside `out_dir` and moved into
    place at the end, so a crash never leaves a half-written pipeline; an existing `out_dir` is
    replaced.
    """
    import diffusers

    if write_transformer is not None:
        components = {**components, "transformer": None}
    copied = [k for k in ("text_encoder", "vae") if copy_from is not None and components.get(k) is None]
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if components.get("processor") is not None:
        edit = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
        cls = getattr(diffusers, pipeline_class if pipeline_class in edit else edit[0])
        pipe = cls(**{k: components.get(k) for k in (*T2I_KEYS, "processor")})
    else:
        pipe = diffusers.QwenImagePipeline(**{k: components.get(k) for k in T2I_KEYS})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if write_transformer is None and not copied:
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
        if copied:
            _copy_components(Path(copy_from), tmp, copied)
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


def _copy_components(source: Path, folder: Path, names: list[str]) -> None:
    """Copy the subfolders `names` of pipeline folder `source` into `folder` and point
    model_index.json's entries at the classes `source`'s model_index.json names for them."""
    import json

    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    theirs = json.loads((source / "model_index.json").read_text())
    for name in names:
        shutil.copytree(source / name, folder / name)
        index[name] = theirs[name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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
