"""How many tokens each healing method needs: the SmolLM2 recipe run per method with one token budget, every
checkpoint gated against the original.

    python benchmarks/healing_curves.py                          # 2M tokens per method: many hours on 2 cores
    python benchmarks/healing_curves.py --tokens 4e4 --checkpoints 4 --methods sft distill-frozen
    python benchmarks/healing_curves.py --set use_cpu=false --set bf16=true --gate-while-training   # on a GPU

Each method is `python adapt/sft.py recipes/smollm2-135m.yaml` with a few overrides (METHODS), run on the checkpoint
`ladder-convert` wrote (runs/smollm2-ladder15 by default). Every saved checkpoint gets a fidelity-only gate (KL and
top-1 on held-out chats); the last one gets the full gate (fidelity, ARC-Easy and ARC-Challenge, greedy answers).
Prints a table (tokens -> KL, top-1, ARC), the tokens each method needed to reach the target, and writes
`healing_curves.png` and `healing_curves.json` into --output. Run again after an interruption, it resumes: finished
runs and gate reports already in --output are reused.
"""

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import matplotlib
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import ladder  # noqa: F401  (registers the ladder model with the Auto classes)
from ladder.adapt.sft import last_complete_checkpoint
from ladder.convert.smollm2 import fetch_smollm2
from ladder.gates import load_gates_file, report, run_gate
from ladder.gates.alpaca import ALPACA_FILE
from ladder.gates.config import fidelity_targets
from ladder.gates.report import Row

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m.yaml"
# Every method spells out what it changes from plain distillation, so a change of the recipe's own default (it follows
# the winner of these curves) changes no method.
DISTILL = {"train_layers": "all", "distill_alpha": 0.9, "learning_rate": 3e-4, "align_tokens": 0}
METHODS = {
    "sft": DISTILL | {"distill_alpha": 0.0, "learning_rate": 1e-4},  # the paper's: CE on the data
    "distill": DISTILL | {"learning_rate": 1e-4},
    "distill-frozen": DISTILL | {"train_layers": "ladder", "learning_rate": 1e-4},  # trunk shared
    "distill-lora": DISTILL | {"train_layers": "ladder", "use_peft": True, "lora_r": 32, "lora_alpha": 64,
                               "lora_target_modules": "all-linear", "learning_rate": 5e-4},
    "distill-lr3e-4": DISTILL,
    # Self-distillation: the original's own greedy answers to the Alpaca training prompts replace the data's answers.
    "self-distill": DISTILL | {"learning_rate": 1e-4, "answers": "teacher"},
    # Layer-wise alignment (adapt/alignment.py) for a share of the budget, then distillation: each ladder layer fed
    # the original's streams (teacher-forced), or the student's own earlier layers' (-student; the recipe's default
    # is align50-student).
    **{f"align{share}{suffix}": DISTILL | {"align_tokens": share / 100, "align_inputs": inputs}
       for suffix, inputs in (("", "teacher"), ("-student", "student")) for share in (25, 50, 75)},
    # KL only (distill_alpha 1.0, as RADLADS and Minitron distil), at gentler learning rates: for a model that
    # `ladder-convert --fit` already brought close, which the default's alignment at 3e-4 pushes away again.
    **{f"kl-lr{lr}": DISTILL | {"distill_alpha": 1.0, "learning_rate": float(lr)} for lr in ("3e-4", "1e-4", "3e-5")},
    "kl-lr1e-4-accum4": DISTILL | {"distill_alpha": 1.0, "learning_rate": 1e-4, "gradient_accumulation_steps": 4},
    # The same with the learning rate constant, then decaying linearly to 0 over the last 40% of the steps (WSD).
    **{f"kl-lr{lr}-wsd": DISTILL | {"distill_alpha": 1.0, "learning_rate": float(lr), "lr_scheduler_type": "warmup_stable_decay",
                                    "lr_scheduler_kwargs": {"num_decay_steps": 0.4, "decay_type": "linear"}}
       for lr in ("1e-4", "3e-5")},
    # LoLCATs / RADLADS: only the rewired (ladder) layers trained, each fed the original's streams, at a high learning
    # rate, for the whole budget.
    "align-ladder-lr1e-3": DISTILL | {"align_tokens": 1.0, "align_inputs": "teacher", "train_layers": "ladder",
                                      "learning_rate": 1e-3},
    # For the greedy answers to agree, not only the next-token distributions on the data: KL to the original on
    # sequences the converted model wrote itself (its greedy answers to the training prompts, generated once before
    # training: on-policy for the starting model), or on the original's own answers.
    **{f"kl-lr3e-5-{source}-answers": DISTILL | {"distill_alpha": 1.0, "learning_rate": 3e-5, "answers": source}
       for source in ("student", "teacher")},
    # Progressive conversion (from a model converted without --fit): the ladder layers switched on one at a time over
    # the first quarter of the budget, in the order `--placement measured` added the demo's 15 layers (benchmarks
    # README), then KL-only distillation with all of them on.
    "kl-lr3e-5-ramp25": DISTILL | {"distill_alpha": 1.0, "learning_rate": 3e-5, "ladder_ramp": 0.25,
                                   "ladder_ramp_order": [25, 26, 27, 8, 6, 20, 23, 21, 5, 4, 22, 24, 28, 7, 14]},
}  # fmt: skip
TARGET = fidelity_targets(load_gates_file().gates["after_adapt"])  # KL and top-1 of the recovery gate


def gates_file(path: Path, chats: int, arc_limit: int | None, curve_generation: bool = False) -> Path:
    """`curve`: fidelity (and with `curve_generation` the greedy answers), for every checkpoint. `final`: the recovery
    target of the issue, for the last one."""
    fidelity = {"chats": chats, "max_length": 512, "top_k": 512, "batch_size": 8}
    arc = {"tasks": ["arc_easy_local", "arc_challenge_local"], "limit": arc_limit, "batch_size": 16}
    generation = {"prompts": 50, "max_new_tokens": 32, "batch_size": 16}
    final = {"kl": {"max": TARGET["kl"]}, "top1_agreement": {"min": TARGET["top1_agreement"]},
             "generation_exact_match": {"min": 0.7}}  # fmt: skip
    suite = {"fidelity": fidelity, "generation": generation}
    if arc_limit != 0:  # --arc-limit 0: no ARC (lm-eval's ARC is most of a gate's time on 2 cores)
        suite["benchmarks"] = arc
        final |= {"arc_easy_local/acc": {"drop_max": 1.0}, "arc_challenge_local/acc": {"drop_max": 1.0}}
    path.write_text(yaml.safe_dump({"suite": suite, "gates": {"final": final}}))
    curve = path.with_name("curve_gates.yaml")
    curve_suite = {"fidelity": fidelity} | ({"generation": generation} if curve_generation else {})
    curve.write_text(yaml.safe_dump({"suite": curve_suite, "gates": {"curve": {}}}))
    return curve


def answers_recipe(source: str, model: Path, output: Path, prompts: int) -> Path:
    """The SmolLM2 recipe with its data replaced by `model`'s greedy answers to the first `prompts` Alpaca prompts
    (generated once into `output`, named by `source`, teacher or student: about a minute per 25 prompts on 2 cores)."""
    answers = output / f"{source}_answers_{prompts}.json"
    if not answers.is_file():
        command = [sys.executable, "-m", "ladder.adapt.teacher_answers", model, ALPACA_FILE, answers, f"--rows=0:{prompts}"]
        subprocess.run(command, cwd=REPO, check=True)
    recipe = yaml.safe_load(RECIPE.read_text())
    # Absolute: a recipe's relative data files are read from the recipe's own folder.
    recipe["datasets"] = [{"path": "json", "data_files": str(answers.resolve()), "split": "train"}]
    path = output / f"recipe_{source}_answers.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train(method: str, converted: Path, output: Path, tokens: float, checkpoints: int, recipe: Path,
          settings: list[str], while_training=None) -> None:  # fmt: skip
    """Runs (or resumes, after an interruption) the recipe for one method, with `settings` (KEY=VALUE) overriding
    both the recipe and the method; a finished run is kept as it is. `while_training`, if given, is called while the
    run trains, whenever it has written a new checkpoint (to gate the checkpoints so far)."""
    if (output / "final" / "config.json").is_file():  # adapt/sft.py writes `final` last
        print(f"\n== {method}: {output} is a finished run; kept")
        return
    overrides = {key: value for key, value in METHODS[method].items() if key != "answers"}
    save_steps = max(1, math.ceil(tokens / tokens_per_step(recipe, overrides, settings) / checkpoints))
    overrides |= {
        "model_name_or_path": converted, "output_dir": output, "max_train_tokens": tokens, "save_steps": save_steps,
        "save_total_limit": None, "gate_after": None, "report_to": "none", "logging_steps": 1,
    }  # fmt: skip
    arguments = [argument for key, value in overrides.items() for argument in flag(key, value)]
    arguments += [f"--{setting}" for setting in settings]
    print(f"\n== {method}: adapt/sft.py {recipe.name} {' '.join(arguments)}", flush=True)
    command = [sys.executable, REPO / "adapt" / "sft.py", recipe, *arguments]
    gated = None
    with subprocess.Popen(command, cwd=REPO) as training:
        try:
            while training.poll() is None:
                written = sorted(output.glob("checkpoint-*/trainer_state.json"))
                if while_training is not None and written != gated:  # only when a checkpoint was added
                    while_training()
                    gated = written
                time.sleep(1)
        except BaseException:  # Ctrl-C or SIGTERM: the training stops with us (and resumes on the next run)
            training.terminate()
            raise
    if training.returncode:
        raise subprocess.CalledProcessError(training.returncode, command)


def flag(key: str, value) -> list[str]:
    """A recipe override as adapt/sft.py's command line takes it."""
    if isinstance(value, list):
        return [f"--{key}", *map(str, value)]
    return [f"--{key}={'null' if value is None else json.dumps(value) if isinstance(value, dict) else value}"]


def tokens_per_step(recipe: Path, overrides: dict, settings: list[str]) -> int:
    """The packed tokens one step trains on at most (the recipe's rows x max_length, as the method and --set leave
    them); checkpoints record the exact count."""
    config = yaml.safe_load(recipe.read_text()) | overrides | dict(setting.split("=", 1) for setting in settings)
    return int(config["per_device_train_batch_size"]) * int(config["gradient_accumulation_steps"]) * int(config["max_length"])


def loadable(checkpoint: Path, converted: Path, work: Path) -> Path:
    """A checkpoint as a model directory: LoRA checkpoints hold only the adapter, merged here into the converted model."""
    if not (checkpoint / "adapter_config.json").is_file():
        return checkpoint
    merged = work / f"merged-{checkpoint.parent.name}-{checkpoint.name}"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted), checkpoint).merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(converted).save_pretrained(merged)
    return merged


def tokens_seen(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["num_input_tokens_seen"]


def seconds_trained(checkpoint: Path) -> float | None:
    """Training time up to the checkpoint (adapt/sft.py logs it; runs from before it did not)."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return max((entry["train_seconds"] for entry in history if "train_seconds" in entry), default=None)


def curve(method: str, run: Path, start: dict, converted: Path, original: Path, gates: Path, curve_gates: Path,
          work: Path, finished: bool = True) -> list[dict]:  # fmt: skip
    """`start`: the converted model's point, the same for every method. While the run still trains (not `finished`)
    every checkpoint so far gets the curve's gate, the last one too."""
    points = [start]
    checkpoints = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    last = Path(last_complete_checkpoint(run)) if finished else None
    for state in checkpoints:
        checkpoint, is_last = state.parent, state.parent == last
        gate, gate_file = ("final", gates) if is_last else ("curve", curve_gates)
        rows = earlier_verdict(checkpoint, gate, gate_file)
        if rows is None:
            rows = run_gate(loadable(checkpoint, converted, work), gate, str(original), gate_file,
                            label=f"{method}@{tokens_seen(checkpoint)}").rows  # fmt: skip
        points.append({"tokens": tokens_seen(checkpoint), "seconds": seconds_trained(checkpoint)} | metrics(rows))
    return points


def earlier_verdict(checkpoint: Path, gate: str, gate_file: Path) -> list[Row] | None:
    """The rows of this gate's report in the checkpoint, if an earlier run of this benchmark wrote it with this suite."""
    gates = load_gates_file(gate_file)
    saved, wanted = report.read(checkpoint, gate), gates.suite.read_by(gates.gates[gate]).as_dict()
    if saved is None or any(saved.suite.get(part) != settings for part, settings in wanted.items() if settings):
        return None
    return saved.rows


def metrics(rows: list[Row]) -> dict:
    return {row.metric: row.candidate for row in rows} | {
        f"original {row.metric}": row.reference for row in rows if "/" in row.metric or "generation" in row.metric
    }


def tokens_to_target(points: list[dict]) -> int | None:
    reached = [p["tokens"] for p in points if p["kl"] <= TARGET["kl"] and p["top1_agreement"] >= TARGET["top1_agreement"]]
    return min(reached, default=None)


def extrapolated_tokens_to_target(points: list[dict]) -> float | None:
    """Where power laws through the trained points (log KL and log top-1 disagreement against log tokens, least
    squares) both meet the target; None when fewer than two points or a curve that does not fall."""
    trained = [p for p in points if p["tokens"] > 0]
    if len(trained) < 2:
        return None
    x = [math.log(p["tokens"]) for p in trained]
    needed = []
    for errors, target in (([p["kl"] for p in trained], TARGET["kl"]),
                           ([1 - p["top1_agreement"] for p in trained], 1 - TARGET["top1_agreement"])):  # fmt: skip
        y = [math.log(max(e, 1e-9)) for e in errors]
        mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
        slope = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / sum((a - mean_x) ** 2 for a in x)
        exponent = mean_x + (math.log(target) - mean_y) / slope if slope < 0 else math.inf
        if exponent > 50:  # a curve that does not fall, or too slowly to name a token count
            return None
        needed.append(math.exp(exponent))
    return max(needed)


def print_table(results: dict[str, list[dict]]) -> None:
    columns = ["kl", "top1_agreement", "arc_easy_local/acc", "arc_challenge_local/acc", "generation_exact_match",
               "generation_common_prefix"]
    print("\n| method | tokens | seconds | " + " | ".join(columns) + " |\n|---|---:|---:|" + "---:|" * len(columns))
    for method, points in results.items():
        for point in points:
            cells = [f"{point[c]:.4f}" if c in point else "" for c in columns]
            seconds = f"{point['seconds']:,.0f}" if point.get("seconds") is not None else ""
            print(f"| {method} | {point['tokens']:,} | {seconds} | " + " | ".join(cells) + " |")
    last = next(iter(results.values()))[-1]
    print("| original | | | 0 | 1 | " + " | ".join(f"{last.get('original ' + c, float('nan')):.4f}" for c in columns[2:]) + " |")
    print(f"\ntokens to the target (KL <= {TARGET['kl']}, top-1 >= {TARGET['top1_agreement']}):")
    needed = {}  # measured only: a ratio of extrapolations would read as a measurement
    for method, points in results.items():
        reached, extrapolated = tokens_to_target(points), extrapolated_tokens_to_target(points)
        needed[method] = reached
        if reached:
            print(f"  {method:16s} {reached:,} (measured)")
        else:
            guess = f"a power law through its checkpoints says ~{extrapolated:,.0f}" if extrapolated else "no trend to extrapolate"
            print(f"  {method:16s} not reached within the budget; {guess}")
    if needed.get("sft") and any(needed.values()):
        best = min((tokens, method) for method, tokens in needed.items() if tokens)
        print(f"  plain SFT / best ({best[1]}): {needed['sft'] / best[0]:.1f}x")


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """KL and top-1 against tokens, and KL against training time (the converted model's point is at 0)."""
    figure, axes = plt.subplots(1, 3, figsize=(16, 4))
    panels = [("kl", "tokens", "tokens trained"), ("top1_agreement", "tokens", "tokens trained"),
              ("kl", "seconds", "training seconds")]  # fmt: skip
    for (metric, x, label), axis in zip(panels, axes):
        for method, points in results.items():
            timed = [p for p in points if p["tokens"] == 0 or p.get(x) is not None]
            axis.plot([p.get(x) or 0 for p in timed], [p[metric] for p in timed], marker="o", label=method)
        axis.axhline(TARGET[metric], color="grey", linestyle=":", linewidth=1, label="target")
        axis.set(xlabel=label, title=f"held-out {metric} (original || adapted)" if metric == "kl" else metric)
        axis.xaxis.set_major_formatter(EngFormatter())  # 100k, not 100000 (long labels overlap)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_results(results: dict[str, list[dict]], output: Path) -> None:
    (output / "healing_curves.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so train() stops its run too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--converted", type=Path, default=REPO / "runs" / "smollm2-ladder15", help="ladder-convert's output")
    parser.add_argument("--tokens", type=float, default=2e6, help="training tokens per method")
    parser.add_argument("--checkpoints", type=int, default=8, help="evaluation points per method")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--chats", type=int, default=100, help="held-out chats for KL and top-1")
    parser.add_argument("--arc-limit", type=int, help="questions per ARC set at the last checkpoint (default: all; 0: none)")
    parser.add_argument("--answer-prompts", type=int, default=4500,
                        help="Alpaca prompts answered for the methods that train on a model's answers (self-distill, *-answers)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="a recipe setting for every method, e.g. --set use_cpu=false --set bf16=true on a GPU")
    parser.add_argument("--gate-while-training", action="store_true",
                        help="gate each checkpoint as soon as it is written, beside the training (on a GPU: the curve "
                             "so far survives a time limit), and rewrite healing_curves.json after each")
    parser.add_argument("--curve-generation", action="store_true",
                        help="greedy answers (exact match, common prefix) at every checkpoint, not only the last")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "healing")
    args = parser.parse_args()
    if malformed := [s for s in args.settings if "=" not in s or s.startswith("=")]:
        parser.error(f"--set {malformed[0]!r}: give KEY=VALUE")
    if not (args.converted / "config.json").is_file():
        sys.exit(f"healing_curves.py: error: {args.converted} is not a converted checkpoint: run ladder-convert first")
    original = fetch_smollm2()
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        curve_gates = gates_file(Path(work) / "gates.yaml", args.chats, args.arc_limit, args.curve_generation)
        start = {"tokens": 0} | metrics(run_gate(args.converted, "curve", str(original), curve_gates, label="converted").rows)
        results = {}
        for method in args.methods:
            run = args.output / method
            source = METHODS[method].get("answers")
            answerer = {"teacher": original, "student": args.converted}.get(source)
            recipe = answers_recipe(source, answerer, args.output, args.answer_prompts) if source else RECIPE
            method_curve = partial(curve, method, run, start, args.converted, original, Path(work) / "gates.yaml",
                                   curve_gates, Path(work))  # fmt: skip

            def gate_so_far(method=method, method_curve=method_curve):
                results[method] = method_curve(finished=False)
                write_results(results, args.output)

            train(method, args.converted, run, args.tokens, args.checkpoints, recipe, args.settings,
                  gate_so_far if args.gate_while_training else None)  # fmt: skip
            results[method] = method_curve()
            write_results(results, args.output)
    plot(results, args.output / "healing_curves.png")
    print_table(results)
    print(f"\nplot: {args.output / 'healing_curves.png'}")


if __name__ == "__main__":
    main()
