"""Conversion cost on a synthetic Llama-shaped checkpoint of several GB, next to hardlinking and copying its shards.

    python benchmarks/convert_speed.py --layers 8        # Llama-3.1-8B shapes, 8 decoder layers: about 5.6 GB

Prints wall time and peak RSS of `ladder-convert` (run as a user runs it, in its own process), the time to hardlink
and to copy the same shards, and the time to sha256 them (the provenance needs every shard's hash, so conversion
reads every byte once).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   vocab_size=128256, head_dim=128)  # fmt: skip


def layer_tensors(i: int, s: dict) -> dict[str, torch.Tensor]:
    h, f, kv = s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"] * s["head_dim"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}  # fmt: skip
    tensors = {f"model.layers.{i}.{name}.weight": torch.ones(shape, dtype=torch.bfloat16) for name, shape in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return tensors


def write_synthetic_checkpoint(directory: Path, num_layers: int) -> None:
    """One shard per decoder layer plus one for embeddings and head, with an index, as save_pretrained lays it out."""
    s = LLAMA_31_8B
    shards = [layer_tensors(i, s) for i in range(num_layers)]
    shards.append({
        "model.embed_tokens.weight": torch.ones(s["vocab_size"], s["hidden_size"], dtype=torch.bfloat16),
        "lm_head.weight": torch.ones(s["vocab_size"], s["hidden_size"], dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(s["hidden_size"], dtype=torch.bfloat16),
    })  # fmt: skip
    weight_map = {}
    for n, tensors in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {**s, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": num_layers,
              "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))


# The converter's own peak, read from the kernel (VmHWM starts afresh at exec, so the benchmark's memory is not counted).
CONVERT_AND_REPORT_PEAK_RSS = """
import re, sys
from ladder.convert.converter import main
assert main([sys.argv[1], "--layers", sys.argv[2], "--output", sys.argv[3]]) == 0
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1])
"""


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def each_shard(source: Path, target: Path, operation) -> None:
    target.mkdir()
    for shard in sorted(source.glob("*.safetensors")):
        operation(shard, target / shard.name)


def sha256_all(source: Path) -> None:
    for shard in sorted(source.glob("*.safetensors")):
        with open(shard, "rb") as stream:
            hashlib.file_digest(stream, "sha256")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of Llama-3.1-8B shape (8 = ~5.6 GB)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        source = work / "source"
        source.mkdir()
        print(f"writing a synthetic checkpoint with {args.layers} Llama-3.1-8B-shaped layers...", flush=True)
        write_synthetic_checkpoint(source, args.layers)
        size_gb = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e9
        command = [sys.executable, "-c", CONVERT_AND_REPORT_PEAK_RSS, source, str(args.layers // 2), work / "converted"]
        result = None

        def convert():
            nonlocal result
            result = subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

        convert_s = timed(convert)
        peak_rss_mb = int(result.stdout.split()[-1]) / 1024
        link_s = timed(lambda: each_shard(source, work / "linked", os.link))
        copy_s = timed(lambda: each_shard(source, work / "copied", shutil.copyfile))
        hash_s = timed(lambda: sha256_all(source))

    print(f"\ncheckpoint: {size_gb:.2f} GB in {args.layers + 1} shards, {os.cpu_count()} cores")
    print(f"{'operation':<34}{'seconds':>9}{'x hardlink':>12}{'x copy':>9}")
    for name, seconds in [("ladder-convert (whole command)", convert_s), ("hardlink the shards", link_s),
                          ("copy the shards", copy_s), ("sha256 the shards (one thread)", hash_s)]:  # fmt: skip
        print(f"{name:<34}{seconds:>9.3f}{seconds / link_s:>12.0f}{seconds / copy_s:>9.2f}")
    print(f"ladder-convert peak RSS: {peak_rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
