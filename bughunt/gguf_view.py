"""A GGUF file read as a checkpoint: the derived view is a Hugging Face-format directory (float32 safetensors under the
architecture's HF names, config.json and the tokenizer), made from the file's tensors and metadata, and cached in the
user cache by the file's content hash. Nothing here dequantizes by hand: gguf-py dequantizes each tensor, and
transformers' GGUF support names it, undoes llama.cpp's Q/K row permutation (its tensor processors) and reads the
config and the tokenizer from the metadata. Tensors are converted one at a time, so a view costs one tensor of memory
beyond the file, never a copy of the model. `view.json` in the view records what was derived, from which file, with
which library versions; llama.cpp runs the file itself (bughunt/implementations/llamacpp.py reads that record)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from bughunt.errors import BughuntError

RECORD = "view.json"  # in a view: what it was derived from (read by sources.describe and the llamacpp runner)
VIEW_FORMAT = 3  # part of a view's cache key: a view written by another format is derived again
_SHARD_BYTES = 2 << 30  # views are written in shards of at most this size, with an index when there are several


def views_root() -> Path:
    from bughunt.tiny import cache_dir

    return cache_dir() / "gguf-views"


def content_hash(path: Path) -> str:
    """sha256 of the file, remembered per (path, size, mtime, inode) so a multi-GB file is hashed once."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    memo = views_root() / "hashes.json"
    known = _read_json(memo)
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    known[key] = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"hashes.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, memo)
    return known[key]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_type(reader) -> str:
    """The file's llama.cpp type in bughunt's dtype spelling: q4_1, q4_k_m, q8_0, fp16, fp32, bf16."""
    import gguf

    field = reader.fields.get("general.file_type")
    if field is None:
        counts: dict[str, int] = {}
        for t in reader.tensors:
            if len(t.shape) >= 2:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
        name = max(counts, key=counts.get) if counts else "F32"
    else:
        name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    return {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(name, name.lower())


def view_of(path: Path) -> Path:
    """The cached view of GGUF file `path`, deriving it on first use (built beside its place, renamed into it)."""
    from bughunt.inputs.gguf_file import check_gguf

    path = Path(path)
    check_gguf(path)
    digest = content_hash(path)
    view = views_root() / f"{digest[:24]}-v{VIEW_FORMAT}"
    if (view / RECORD).is_file():
        _point_at(view, path)
        return view
    view.parent.mkdir(parents=True, exist_ok=True)
    tmp = view.with_name(f"{view.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        record = _derive_in_child(path, tmp)
        record.update(sha256=digest, view=str(view))
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
        try:
            os.rename(tmp, view)
        except OSError:  # another run derived it first: theirs is the same content
            if not (view / RECORD).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return view


def _point_at(view: Path, path: Path) -> None:
    """The view's record names the file this run was given (a copy of the same content may have derived it, and may
    since have moved): llama.cpp runs that file, and result.json names it."""
    record = _read_json(view / RECORD)
    if record.get("file") != str(path.resolve()):
        record["file"] = str(path.resolve())
        tmp = view / f"{RECORD}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, view / RECORD)


def _derive_in_child(path: Path, out: Path) -> dict:
    """`_derive` in a child process: torch, transformers' GGUF loader and the tokenizer build leave nothing behind in
    the caller's process (its memory and any global state), which may go on to load models in-process."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bughunt.gguf_view", str(path), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        said = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        if proc.returncode == 2 and said:
            raise BughuntError(said[-1].removeprefix("bughunt: error: "))
        raise BughuntError(f"deriving the checkpoint view of {path} failed (exit {proc.returncode}): "
                           f"{' '.join(said[-3:])[:600] or 'no message'}")
    return json.loads((out / RECORD).read_text())


def _derive(path: Path, out: Path) -> dict:
    import gguf
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise BughuntError(f"transformers {transformers.__version__} cannot read {path} as a model ({e}). bughunt reads "
                           "GGUF files of the architectures transformers' GGUF loader supports.") from None
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[parsed["config"]["model_type"]].from_dict(dict(parsed["config"]))  # AutoConfig's own path
    reader = gguf.GGUFReader(str(path))
    arch = str(parsed["config"].get("model_type"))
    names, processor, model_class = _name_map(config, parsed, reader)
    _write_config(config, model_class, out)
    types, skipped = _write_weights(reader, names, processor, parsed, out)
    tokenizer = _write_tokenizer(path, out)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {"kind": "gguf", "file": str(path.resolve()), "size": path.stat().st_size, "file_type": file_type(reader),
            "architecture": arch, "gguf_architecture": str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8"),
            "vocabulary": "real" if "tokenizer.ggml.tokens" in reader.fields else "none", "tensor_types": counts, "tensors": len(types), "types": types, "not_carried": skipped,
            "derived": {"weights": f"float32 safetensors, each tensor dequantized by gguf-py {_version('gguf')} and named "
                                   f"and un-permuted by transformers {transformers.__version__}'s GGUF tensor processor",
                        "config": f"transformers {transformers.__version__} AutoConfig from the GGUF metadata "
                                  "(quantization_config dropped)",
                        "tokenizer": tokenizer},
            "versions": {"gguf": _version("gguf"), "transformers": transformers.__version__}}


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _write_config(config, model_class: str, out: Path) -> None:
    data = config.to_dict()
    data.pop("quantization_config", None)
    data.update(architectures=[model_class], dtype="float32")  # what the view's safetensors hold
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True))


def _name_map(config, parsed: dict, reader) -> tuple[dict[str, str], object, str]:
    """GGUF tensor name -> HF parameter name, built on a model with no storage. gguf-py's name map of the architecture
    names every parameter of the decoder families bughunt runs; where it leaves one unnamed, transformers' own (slower,
    recursive) map is used instead."""
    import torch
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch_enum = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    names: dict[str, str] = {}
    if arch_enum is not None:
        table = get_tensor_name_map(arch_enum, config.num_hidden_layers)
        for hf_name in model.state_dict():
            stem, dot, suffix = processor.preprocess_name(hf_name).rpartition(".")
            gguf_name = table.get_name(stem) if suffix in ("weight", "bias") else None
            if gguf_name is None:
                names = {}
                break
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names or get_gguf_hf_weights_map(model, processor), processor, type(model).__name__


def _write_weights(reader, names: dict[str, str], processor, parsed: dict, out: Path) -> tuple[dict[str, str], list[str]]:
    """Each tensor dequantized and written under its HF name; returns (HF name -> the GGUF's type for it, GGUF tensors
    no HF parameter takes)."""
    from gguf import dequantize

    from bughunt.safetensors_io import SafetensorsWriter

    shards: list[tuple[Path, list[str]]] = []
    writer, size, skipped, types = None, 0, [], {}
    for tensor in reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name not in names:
            skipped.append(tensor.name)
            continue
        values = np.ascontiguousarray(result.weights, dtype=np.float32)
        if writer is None or size + values.nbytes > _SHARD_BYTES:
            if writer is not None:
                writer.close({"format": "pt"})
            shards.append((out / f"model-{len(shards) + 1:05d}.safetensors", []))
            writer, size = SafetensorsWriter(shards[-1][0], len(reader.tensors)), 0
        writer.add(names[result.name], values)
        types[names[result.name]] = tensor.tensor_type.name
        shards[-1][1].append(names[result.name])
        size += values.nbytes
    if writer is not None:
        writer.close({"format": "pt"})
    if len(shards) == 1:
        shards[0][0].rename(out / "model.safetensors")
    else:
        total = sum(p.stat().st_size for p, _ in shards)
        index = {"metadata": {"total_size": total}, "weight_map": {n: p.name for p, ns in shards for n in ns}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return types, skipped


def _write_tokenizer(path: Path, out: Path) -> str:
    """The tokenizer transformers builds from the GGUF's vocabulary; a file without one gives an ids-only view."""
    import transformers
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - any failure leaves the view without a tokenizer, and says why
        return f"none: transformers could not build one from the GGUF metadata ({type(e).__name__}: {str(e)[:200]})"
    tok.save_pretrained(str(out))
    return f"transformers {transformers.__version__} AutoTokenizer from the GGUF metadata ({type(tok).__name__})"


if __name__ == "__main__":  # the child `_derive_in_child` starts: python -m bughunt.gguf_view FILE OUT
    import sys

    try:
        (Path(sys.argv[2]) / RECORD).write_text(json.dumps(_derive(Path(sys.argv[1]), Path(sys.argv[2]))))
    except BughuntError as e:
        print(f"bughunt: error: {e}", file=sys.stderr)
        sys.exit(2)
