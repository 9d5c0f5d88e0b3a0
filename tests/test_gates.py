"""Evaluation gates on real SmolLM2 weights: an identical candidate passes, the converted one fails after_adapt,
the ARC number is lm-eval's own, and bad input is one line with exit code 2."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ladder_twin, read_json

from ladder.convert import converter
from ladder.gates import cli, fidelity
from ladder.gates.config import DEFAULT_GATES_FILE, BenchmarkConfig, FidelityConfig, GateConfigError, load_gates_file
from ladder.gates.alpaca import HELDOUT, TRAIN, alpaca_records
from ladder.gates import report
from ladder.gates.report import judge
from ladder.gates.stats import pooled_mean

REPO = Path(__file__).resolve().parents[1]


ARC_QUESTIONS = 20


def small_gates(path: Path, gates: dict | None = None, **suite_overrides) -> Path:
    """The default gates (or `gates`) with a suite small enough for tests; an override of None leaves that part out."""
    config = yaml.safe_load(DEFAULT_GATES_FILE.read_text())
    config["gates"] = gates or config["gates"]
    suite = {
        "fidelity": {"chats": 24, "max_length": 256, "top_k": 512, "batch_size": 8},
        "benchmarks": {"tasks": ["arc_easy_local"], "limit": ARC_QUESTIONS, "batch_size": 16},
        "generation": {"prompts": 6, "max_new_tokens": 32, "batch_size": 6},
    } | suite_overrides
    config["suite"] = {part: settings for part, settings in suite.items() if settings is not None}
    path.write_text(yaml.safe_dump(config))
    return path


def linked_copy(source: Path, target: Path) -> Path:
    """A checkpoint directory of our own (reports are written into it) without copying the weights."""
    target.mkdir()
    for file in source.iterdir():
        os.link(file, target / file.name)
    return target


@pytest.fixture(scope="module")
def workspace(smollm2_dir, tmp_path_factory):
    """A private cache for reference results, and a small gates file."""
    work = tmp_path_factory.mktemp("gates")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LADDER_CACHE", str(work / "cache"))
        yield work, small_gates(work / "gates.yaml")


def ladder_eval(*args) -> int:
    return cli.main([str(a) for a in args])


def test_identical_candidate_passes_with_exact_numbers(workspace, smollm2_dir, capsys):
    work, gates = workspace
    candidate = linked_copy(smollm2_dir, work / "same")
    assert ladder_eval(candidate, "--reference", smollm2_dir, "--gate", "after_adapt", "--gates-file", gates) == 0
    report = read_json(candidate / "ladder_gate_after_adapt.json")
    rows = {row["metric"]: row for row in report["rows"]}
    assert report["passed"] and rows["kl"]["candidate"] == 0.0
    assert rows["top1_agreement"]["candidate"] == 1.0
    for metric in ("response_perplexity", "arc_easy_local/acc", "generation_common_prefix"):
        assert rows[metric]["candidate"] == rows[metric]["reference"]
    assert rows["generation_exact_match"]["candidate"] == 1.0
    assert 0.3 < rows["arc_easy_local/acc"]["reference"] < 0.8  # SmolLM2 answers ARC-Easy well above chance
    arc = rows["arc_easy_local/acc"]  # a proportion over n questions: stderr sqrt(p (1 - p) / (n - 1))
    expected_stderr = (arc["reference"] * (1 - arc["reference"]) / (ARC_QUESTIONS - 1)) ** 0.5
    assert arc["reference_stderr"] == arc["candidate_stderr"] == pytest.approx(expected_stderr)
    assert rows["kl"]["candidate_stderr"] == 0.0 and 0 < rows["response_perplexity"]["reference_stderr"] < 1
    assert "| metric | reference | candidate | delta | threshold | pass |" in (candidate / "ladder_gate_after_adapt.md").read_text()
    assert "measuring the reference" in capsys.readouterr().out


def test_converted_model_fails_after_adapt_and_reuses_the_cached_reference(workspace, smollm2_dir, capsys):
    work, gates = workspace
    candidate = work / "ladder15"
    assert converter.main([str(smollm2_dir), "--layers", "15", "--output", str(candidate), "--no-eval"]) == 0
    assert not list(candidate.glob("ladder_gate_*"))  # --no-eval skips the gate
    capsys.readouterr()
    # No --reference: the provenance names the original.
    assert ladder_eval(candidate, "--gate", "after_adapt", "--gates-file", gates) == 1
    captured = capsys.readouterr()
    assert "reference results from the cache" in captured.out and "measuring the reference" not in captured.out
    assert "failed on: kl, top1_agreement, response_perplexity" in captured.err
    rows = {row["metric"]: row for row in read_json(candidate / "ladder_gate_after_adapt.json")["rows"]}
    assert rows["kl"]["candidate"] > 0.5 and rows["kl"]["passed"] is False
    assert rows["top1_agreement"]["candidate"] < 0.7
    assert 0 < rows["kl"]["candidate_stderr"] < rows["kl"]["candidate"] / 4  # over 24 chats
    # The same model passes the sanity gate: its perplexity is worse, but within 10x.
    # It measures only what its thresholds read (fidelity: no ARC, no generation), the original's from the cache.
    sanity = small_gates(work / "sanity.yaml", {"after_convert": {"response_perplexity": {"ratio_max": 10.0}}})
    assert ladder_eval(candidate, "--gate", "after_convert", "--gates-file", sanity) == 0
    assert "reference results from the cache: fidelity (" in capsys.readouterr().out
    sanity_report = read_json(candidate / "ladder_gate_after_convert.json")
    assert sanity_report["passed"] and [part for part, settings in sanity_report["suite"].items() if settings] == ["fidelity"]
    assert [row["metric"] for row in sanity_report["rows"]] == ["kl", "top1_agreement", "response_perplexity"]


def test_ladder_convert_runs_the_after_convert_gate(workspace, smollm2_dir):
    work, _ = workspace
    output = work / "converted-with-gate"
    sanity = small_gates(work / "sanity.yaml", {"after_convert": {"response_perplexity": {"ratio_max": 10.0}}})
    assert converter.main([str(smollm2_dir), "--layers", "15", "--output", str(output), "--gates-file", str(sanity)]) == 0
    report = read_json(output / "ladder_gate_after_convert.json")
    assert report["passed"] and report["candidate"] == str(output)
    assert (output / "ladder_gate_after_convert.md").is_file()


def test_failing_after_convert_gate_keeps_the_checkpoint_and_exits_1(workspace, smollm2_dir, tmp_path):
    gates = small_gates(tmp_path / "strict.yaml", {"after_convert": {"kl": {"max": 0.01}}})
    output = tmp_path / "out"
    assert converter.main([str(smollm2_dir), "--layers", "15", "--output", str(output), "--gates-file", str(gates)]) == 1
    assert read_json(output / "ladder_gate_after_convert.json")["passed"] is False


def test_our_arc_easy_equals_lm_eval_run_directly(workspace, smollm2_dir, tmp_path):
    work, _ = workspace
    ours = {r["metric"]: r for r in read_json(work / "same" / "ladder_gate_after_adapt.json")["rows"]}
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={smollm2_dir},dtype=float32",
        "--tasks", "arc_easy_local", "--include_path", str(REPO / "gates" / "tasks"), "--limit", str(ARC_QUESTIONS),
        "--batch_size", "16", "--device", "cpu", "--output_path", str(tmp_path / "lm_eval"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(next((tmp_path / "lm_eval").rglob("results*.json")).read_text())["results"]["arc_easy_local"]
    assert results["acc,none"] == ours["arc_easy_local/acc"]["reference"]
    assert results["acc_norm,none"] == ours["arc_easy_local/acc_norm"]["reference"]
    assert results["acc_stderr,none"] == ours["arc_easy_local/acc"]["reference_stderr"]


def test_bucketed_kl_is_close_to_the_exact_kl(smollm2, smollm2_tokenizer):
    config = FidelityConfig(chats=8, max_length=256, batch_size=8)
    batch = fidelity.chat_batches(smollm2_tokenizer, config)[0]
    candidate = ladder_twin(smollm2, range(15, 30))
    ref_logp, _ = fidelity.response_log_probs(smollm2, batch)
    cand_logp, _ = fidelity.response_log_probs(candidate, batch)
    exact = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1).mean()
    top, ids = ref_logp.topk(config.top_k, dim=-1)
    bucketed = fidelity.bucketed_kl(top, cand_logp.gather(1, ids)).mean()
    assert exact > 0.5
    assert bucketed <= exact + 1e-4 and (exact - bucketed) / exact < 0.01


def test_heldout_split_is_never_in_the_training_split():
    heldout, train = alpaca_records(HELDOUT), alpaca_records(TRAIN)
    assert len(heldout) == 500 and len(train) == 4500
    assert not {r["instruction"] for r in heldout} & {r["instruction"] for r in train}
    assert HELDOUT.start >= TRAIN.stop


def test_a_gate_measures_the_parts_and_tasks_its_entries_name():
    suite = replace(load_gates_file().suite, benchmarks=BenchmarkConfig(tasks=["arc_easy_local", "arc_challenge_local"]))
    assert list(suite.read_by({"response_perplexity": {"ratio_max": 10.0}}).parts()) == ["fidelity"]
    challenge = suite.read_by({"arc_challenge_local/acc_norm": {"drop_max": 1.0}, "generation_common_prefix": {}})
    assert list(challenge.parts()) == ["benchmarks", "generation"] and challenge.benchmarks.tasks == ["arc_challenge_local"]
    assert suite.read_by({}) == suite


def test_thresholds_judge_each_kind():
    metrics = {"kl": (0.0, 0.04), "top1_agreement": (1.0, 0.85), "ppl": (8.0, 8.4), "arc/acc": (0.50, 0.495)}
    thresholds = {"kl": {"max": 0.05}, "top1_agreement": {"min": 0.9}, "ppl": {"ratio_max": 1.03},
                  "arc/acc": {"drop_max": 1.0}, "missing": {"max": 1}}  # fmt: skip
    verdicts = {row.metric: row.passed for row in judge(metrics, thresholds)}
    assert verdicts == {"kl": True, "top1_agreement": False, "ppl": False, "arc/acc": True, "missing": False}


@pytest.mark.parametrize("drop, stderr, passed", [(0.03, None, False), (0.03, 0.01, True), (0.045, 0.01, False)])
def test_a_drop_is_judged_against_its_standard_error(drop, stderr, passed):
    """drop_max 1 point, plus two standard errors of the drop: sqrt(2) x 1 point each -> 1 + 2.83 points."""
    [row] = judge({"arc/acc": (0.5, 0.5 - drop, stderr, stderr)}, {"arc/acc": {"drop_max": 1.0}})
    assert row.passed is passed and (row.reference_stderr, row.candidate_stderr) == (stderr, stderr)
    assert row.threshold == ("drop ≤ 1 + 2 SE (2.8)" if stderr else "drop ≤ 1")
    table = report.markdown([row], "t")
    assert (f"| 0.5000 ± {stderr:.4f} |" in table) if stderr else ("| 0.5000 | " in table)


def test_the_standard_error_over_chats_treats_each_chat_as_one_sample():
    torch.manual_seed(0)
    counts = torch.randint(1, 40, (60,))
    per_token = [torch.randn(int(n)) + torch.randn(()) for n in counts]  # tokens of a chat share its offset
    mean, stderr = pooled_mean(torch.stack([chat.sum() for chat in per_token]), counts)
    assert mean == pytest.approx(torch.cat(per_token).double().mean().item())
    resampled = []  # the bootstrap over chats agrees with the closed form
    for _ in range(2000):
        pick = torch.randint(0, len(counts), (len(counts),))
        resampled.append(torch.cat([per_token[i] for i in pick]).mean())
    assert stderr == pytest.approx(torch.stack(resampled).std().item(), rel=0.1)
    assert stderr > 1.5 * torch.cat(per_token).std().item() / len(torch.cat(per_token)) ** 0.5  # not per token
    assert pooled_mean(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.ones(4)) == pytest.approx((0.75, 0.25))


@pytest.mark.parametrize(
    "text, message",
    [("suite: {fidelity: {chats: 10}}\ngates: {g: {kl: {max: 1}}}\nextra: 1", "unknown key 'extra'"),
     ("suite: {fidelity: {chatz: 10}}", "unknown key 'chatz'"),
     ("suite: {fidelity: {chats: ten}}", r"suite\.fidelity\.chats: Input should be a valid integer \(got 'ten'\)"),
     ("suite: {fidelity: {chats: -5}}", "chats: Input should be greater than or equal to 1"),
     ("suite: {generation: {prompts: 900}}", "prompts: Input should be less than or equal to 500"),
     ("suite: {fidelity: {batch_size: 0}}", "batch_size: Input should be greater than or equal to 1"),
     ("suite: {benchmarks: {limit: true}}", "limit"),
     ("[1, 2]", "the file: Input should be a dictionary"),
     ("suite: {fidelity: {}}\ngates: {g: {arc_easy_local/acc: {drop_max: 1}}}", "unknown key 'arc_easy_local/acc'"),
     ("suite: {fidelity: {}}\ngates: {g: {kl: {below: 1}}}", "gates.g.kl.below: Input should be 'max', 'min', 'ratio_max' or 'drop_max'"),
     ("suite: [1, 2", "not valid YAML")],
)  # fmt: skip
def test_malformed_gates_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "gates.yaml"
    path.write_text(text)
    with pytest.raises(GateConfigError, match=message):
        load_gates_file(path)


def assert_usage_error(args, message, capsys):
    assert ladder_eval(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ladder-eval: error: ") and message in err, err


def test_bad_inputs_exit_2_with_one_line(workspace, smollm2_dir, smollm2_tokenizer, tmp_path, capsys, monkeypatch):
    work, gates = workspace
    assert_usage_error([tmp_path / "missing", "--reference", smollm2_dir, "--gate", "after_adapt"], "not a checkpoint", capsys)
    assert_usage_error([work / "same", "--reference", tmp_path / "nowhere", "--gate", "after_adapt"], "no such directory", capsys)
    assert_usage_error([work / "same", "--gate", "after_lunch", "--gates-file", gates], "unknown gate 'after_lunch'", capsys)

    other_vocab = linked_copy(smollm2_dir, tmp_path / "other-vocab")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other_vocab / name).unlink()
    tokenizer = type(smollm2_tokenizer).from_pretrained(smollm2_dir)
    tokenizer.add_tokens(["<ladder>"])
    tokenizer.save_pretrained(other_vocab)
    assert_usage_error([other_vocab, "--reference", smollm2_dir, "--gate", "after_adapt"], "tokenizer differs", capsys)

    sanity = {"after_convert": {"kl": {"max": 10}}}
    unknown = small_gates(tmp_path / "unknown.yaml", sanity, benchmarks={"tasks": ["no_such_task"]})
    assert_usage_error([work / "same", "--gate", "after_convert", "--gates-file", unknown], "unknown task 'no_such_task'", capsys)

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_task = small_gates(tmp_path / "hub.yaml", sanity, benchmarks={"tasks": ["arc_easy"]})
    assert_usage_error([work / "same", "--gate", "after_convert", "--gates-file", hub_task], "use arc_easy_local", capsys)

    broken = tmp_path / "broken.yaml"
    broken.write_text("suite: {fidelity: {chats: 10, colour: red}}")
    assert_usage_error([work / "same", "--gate", "after_convert", "--gates-file", broken], "unknown key 'colour'", capsys)
