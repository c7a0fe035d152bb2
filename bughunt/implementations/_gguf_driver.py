"""Runs llama.cpp's vendored converter (convert_hf_to_gguf.py's main(), step for step) in its own process, with one
addition: the vocabulary path. usage: _gguf_driver.py CONVERTER_DIR, with a JSON list of jobs on stdin
({"checkpoint", "outfile", "outtype": f32|f16|bf16, "vocab": auto|real|none, "vocab_only": bool}), so several checkpoints convert for
one import of torch. Prints one JSON line per job on stdout: the architecture and the vocabulary path taken, or the
converter's own error."""

import json
import logging
import sys
import traceback
from pathlib import Path


def convert(job: dict) -> dict:
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[job["outtype"]]
    vocab, dir_model = job["vocab"], Path(job["checkpoint"])
    taken = {"vocabulary": vocab, "vocabulary_reason": None}
    with torch.inference_mode():
        hparams = ModelBase.load_hparams(dir_model, False)
        arch = get_model_architecture(hparams, ModelType.TEXT)
        try:
            model_class = get_model_class(arch)
        except NotImplementedError:
            return {"ok": False, "unsupported": True, "error": f"llama.cpp's converter does not support architecture {arch}"}

        class Converted(model_class):  # the converter's own class; only the vocabulary step may be swapped
            model_arch = model_class.model_arch

            def set_vocab(self):
                if vocab != "none":
                    before = {k for kv in self.gguf_writer.kv_data for k in kv}
                    try:
                        super().set_vocab()
                        taken["vocabulary"] = "real"
                        return
                    except Exception as e:  # the converter refused the tokenizer
                        if vocab == "real":
                            raise
                        for key in {k for kv in self.gguf_writer.kv_data for k in kv} - before:
                            self.gguf_writer.remove_key(key)
                        taken["vocabulary_reason"] = f"the converter refused the tokenizer: {type(e).__name__}: {e}"
                self._set_vocab_none()
                self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])
                taken["vocabulary"] = "none"

        Converted.__name__ = model_class.__name__
        model = Converted(dir_model, ftype, Path(job["outfile"]), is_big_endian=False, use_temp_file=False, eager=False,
                          metadata_override=None, model_name=None, split_max_tensors=0, split_max_size=0,
                          dry_run=False, small_first_shard=False, remote_hf_model_id=None)
        if job.get("vocab_only"):  # convert_hf_to_gguf.py --vocab-only: the tokenizer and metadata, no tensors
            model.write_vocab()
        else:
            model.write()
    return {"ok": True, "architecture": arch, "gguf_arch": gguf.MODEL_ARCH_NAMES[model_class.model_arch], **taken}


def main() -> int:
    converter = sys.argv[1]
    sys.path.insert(0, converter)
    sys.path.insert(1, str(Path(converter) / "gguf-py"))  # as convert_hf_to_gguf.py does unless NO_LOCAL_GGUF
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the converter prints goes to the log, not into the answers
    for job in json.loads(sys.stdin.read()):
        try:
            answer = convert(job)
        except Exception as e:
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
