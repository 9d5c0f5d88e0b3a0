"""The adaptation stage on a tiny ladder model with SmolLM2's real tokenizer: recipes are validated before any model
loads, training respects the token budget and the frozen layers, LoRA is merged, and a killed run resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO, SFT, read_json, tiny_gates, wait_for_a_checkpoint, write_recipe
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from ladder.adapt import packed_attention
from ladder.adapt.packed_attention import NAME as PACKED_ATTENTION
from ladder.adapt.packed_attention import sequence_starts
from ladder.adapt.sft import last_complete_checkpoint
from ladder.adapt.teacher_answers import main as teacher_answers_main
from ladder.adapt import trainer as trainer_module
from ladder.adapt.trainer import (
    DistillingSFTTrainer,
    LadderRamp,
    SharedTrunkTeacher,
    distillation_sums,
    freeze_all_but,
    share_trunk,
)
from ladder.convert.converter import convert
from ladder.gates.alpaca import alpaca_chat


def sft(*args, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SFT, *map(str, args)], capture_output=True, text=True, cwd=REPO, **popen)


def test_training_heals_only_the_ladder_layers_within_the_token_budget(tiny_pair, tmp_path):
    original, ladder = tiny_pair
    gates = tiny_gates(tmp_path / "gates.yaml")
    recipe = write_recipe(tmp_path / "r.yaml", ladder, tmp_path / "run", gates_file=str(gates), gate_before="sane",
                          gate_after="sane", report_to=["tensorboard"])  # fmt: skip
    result = sft(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(ladder / "ladder_gate_sane.json")["passed"]  # the before gate judges the converted model
    assert "plan: 1,500 tokens" in result.stdout
    final = tmp_path / "run" / "final"
    provenance = read_json(final / "ladder_provenance.json")
    tokens = provenance["adaptation"]["tokens"]
    assert 1500 <= tokens < 1500 + 2 * 96 * 2  # stops within one step of the budget
    assert provenance["ladder_layers"] == [3, 4, 5] and provenance["adaptation"]["steps"] >= 1
    before, after = load_file(ladder / "model.safetensors"), load_file(final / "model.safetensors")
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        assert changed == any(f"layers.{i}." in name for i in (3, 4, 5)), name
    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == "LadderLlamaForCausalLM" and model.config.ladder_layers == [3, 4, 5]
    settings = yaml.safe_load((final / "recipe.yaml").read_text())  # the recipe as the run read it
    assert settings["max_train_tokens"] == 1500 and settings["gates_file"] == str(gates) and settings["datasets"]
    assert provenance["adaptation"]["settings"] == settings
    assert not list((tmp_path / "run").rglob("README.md"))  # no Trainer model card: ladder-publish writes the card
    assert (final / "modeling_ladder_llama.py").is_file() and (final / "chat_template.jinja").is_file()
    assert (final / "training_curves.png").stat().st_size > 10_000
    assert read_json(final / "ladder_gate_sane.json")["reference"] == str(original)
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))  # TensorBoard logs


def test_failed_after_gate_is_the_exit_code(tiny_pair, tmp_path):
    _, ladder = tiny_pair
    gates = tiny_gates(tmp_path / "gates.yaml")
    recipe = write_recipe(tmp_path / "r.yaml", ladder, tmp_path / "run", gates_file=str(gates), gate_after="perfect",
                          max_train_tokens=300)  # fmt: skip
    result = sft(recipe)
    assert result.returncode == 1, result.stderr[-3000:]
    assert read_json(tmp_path / "run" / "final" / "ladder_gate_perfect.json")["passed"] is False


def test_lora_is_merged_into_a_plain_checkpoint_with_the_adapters_logits(tiny_pair, tmp_path):
    _, ladder = tiny_pair
    recipe = write_recipe(tmp_path / "r.yaml", ladder, tmp_path / "run", use_peft=True, lora_r=4, lora_alpha=8,
                          lora_target_modules=["q_proj", "v_proj", "down_proj"], distill_alpha=0.0,
                          max_train_tokens=400)  # fmt: skip
    result = sft(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "run" / "final"
    weights = load_file(final / "model.safetensors")
    assert not any("lora" in name for name in weights)
    before = load_file(ladder / "model.safetensors")
    assert not torch.equal(weights["model.layers.4.self_attn.q_proj.weight"], before["model.layers.4.self_attn.q_proj.weight"])
    assert torch.equal(weights["model.layers.1.self_attn.q_proj.weight"], before["model.layers.1.self_attn.q_proj.weight"])

    # The last checkpoint holds the trained adapter, unmerged: on the converted model it gives the merged logits.
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ladder), last_complete_checkpoint(tmp_path / "run"))
    ids = torch.randint(3, 49152, (2, 16))
    with torch.no_grad():
        unmerged, merged = adapter(ids).logits, AutoModelForCausalLM.from_pretrained(final)(ids).logits
    assert not torch.allclose(unmerged, AutoModelForCausalLM.from_pretrained(ladder)(ids).logits, atol=1e-3)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [{"distill_alpha": 0.0}, {"distill_alpha": 0.5, "align_tokens": 3000}],
                         ids=["sft", "alignment"])  # fmt: skip
def test_killed_run_resumes_without_counting_tokens_twice(tiny_pair, tmp_path, method):
    _, ladder = tiny_pair
    recipe = write_recipe(tmp_path / "r.yaml", ladder, tmp_path / "run", max_train_tokens=3000, **method)
    process = subprocess.Popen([sys.executable, SFT, recipe], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    wait_for_a_checkpoint(tmp_path / "run")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "run" / "final").exists(), "killed too late to test resuming"
    result = sft(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    resumed = read_json(tmp_path / "run" / "final" / "ladder_provenance.json")["adaptation"]["tokens"]

    uninterrupted = write_recipe(tmp_path / "u.yaml", ladder, tmp_path / "straight", max_train_tokens=3000, **method)
    assert sft(uninterrupted).returncode == 0
    assert read_json(tmp_path / "straight" / "final" / "ladder_provenance.json")["adaptation"]["tokens"] == resumed
    logged = read_json(Path(last_complete_checkpoint(str(tmp_path / "run"))) / "trainer_state.json")["log_history"]
    phases = {"align_loss" in entry for entry in logged if "loss" in entry}
    assert phases == {"align_tokens" in method}  # the whole budget is alignment, or none of it


def test_distillation_starts_adamw_afresh_after_alignment_and_a_resumed_run_does_not_again(tiny_pair, tmp_path):
    """AdamW's moments from alignment's small gradients would inflate distillation's first updates: they are cleared
    at distillation's first step, once (a run resumed during distillation keeps the moments its checkpoint holds)."""
    _, ladder = tiny_pair
    recipe = write_recipe(tmp_path / "r.yaml", ladder, tmp_path / "run", max_train_tokens=3000, align_tokens=1500,
                          save_steps=1)  # fmt: skip
    assert sft(recipe).returncode == 0
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    logged = read_json(checkpoints[-1] / "trainer_state.json")["log_history"]
    aligning = [("align_loss" in entry) for entry in logged if "loss" in entry]
    aligned = sum(aligning)
    assert aligning == [True] * aligned + [False] * (len(aligning) - aligned) and 0 < aligned < len(aligning)

    def adam_steps(checkpoint: Path) -> int:
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
        return max(int(parameter["step"]) for parameter in state.values())

    steps = [step if step <= aligned else step - aligned for step in range(1, len(checkpoints) + 1)]
    assert [adam_steps(checkpoint) for checkpoint in checkpoints] == steps
    for later in checkpoints[aligned + 2 :]:  # resume two steps into distillation
        shutil.rmtree(later)
    shutil.rmtree(tmp_path / "run" / "final")
    result = sft(recipe)
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr[-3000:]
    assert adam_steps(checkpoints[-1]) == steps[-1]


def test_resume_skips_a_checkpoint_killed_while_saving(tmp_path):
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # weights written, trainer_state.json not yet
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(str(tmp_path / "nothing-yet")) is None


def test_distillation_loss_mixes_kl_and_cross_entropy(tiny_pair):
    original, ladder = tiny_pair
    student = AutoModelForCausalLM.from_pretrained(ladder)
    teacher = AutoModelForCausalLM.from_pretrained(original)
    ids = torch.randint(3, 49152, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    inputs = {"input_ids": ids, "labels": labels}
    loss = DistillingSFTTrainer.compute_loss
    fake = type("Fake", (), {"model": student, "_metrics": {"train": {}}, "aligner": None})

    def mixed(alpha, teacher_model):
        trainer = fake()
        trainer.teacher, trainer.alpha, trainer.temperature = teacher_model, alpha, 1.0
        with torch.no_grad():
            return loss(trainer, student, dict(inputs)).item()

    ce = student(input_ids=ids, labels=labels).loss.item()
    assert mixed(1e-9, student) == pytest.approx(ce, rel=1e-5)  # alpha -> 0: plain cross-entropy
    assert mixed(1.0, student) == pytest.approx(0.0, abs=1e-6)  # the teacher is the student: no KL
    with torch.no_grad():
        s, t = student(ids).logits[:, :-1][labels[:, 1:] != -100], teacher(ids).logits[:, :-1][labels[:, 1:] != -100]
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean().item()
    assert mixed(1.0, teacher) == pytest.approx(kl, rel=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_distillation_loss_in_chunks_equals_it_whole_with_the_same_gradients(monkeypatch, temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 9, 50, requires_grad=True), torch.randn(2, 9, 50)
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :3] = -100
    sums, grads = [], []
    for chunk_values in (1 << 27, 50 * 4):  # everything at once; 4 rows a chunk, recomputed in the backward pass
        monkeypatch.setattr(trainer_module, "CHUNK_VALUES", chunk_values)
        ce, kl = distillation_sums(student, teacher, targets, temperature)
        (grad,) = torch.autograd.grad(0.3 * ce + kl, student)
        sums.append(torch.stack([ce, kl]).detach())
        grads.append(grad)
    assert torch.allclose(sums[0], sums[1], rtol=1e-5) and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_teacher_sharing_the_frozen_trunk_gives_the_full_teachers_logits(tiny_pair):
    original, ladder = tiny_pair
    student = AutoModelForCausalLM.from_pretrained(ladder)
    freeze_all_but(student, student.config.ladder_layers)
    full = AutoModelForCausalLM.from_pretrained(original)
    shared = share_trunk(student, AutoModelForCausalLM.from_pretrained(original))
    assert isinstance(shared, SharedTrunkTeacher) and len(shared.teacher.model.layers) == 3  # layers 3-5 only
    ids = torch.randint(3, 49152, (1, 16))
    packed = {"input_ids": ids, "position_ids": torch.cat([torch.arange(7), torch.arange(9)])[None]}  # two sequences
    with torch.no_grad():
        student(**packed)  # the student runs first and leaves its layer-2 output for the teacher
        assert torch.equal(shared(**packed).logits, full(**packed).logits)
    # A trunk that trains (or differs from the teacher's) is not shared.
    assert share_trunk(AutoModelForCausalLM.from_pretrained(ladder), full) is full


@pytest.mark.parametrize("which", ["original", "ladder"])
def test_packed_attention_gives_each_sequence_its_own_logits_and_gradients(tiny_pair, which, monkeypatch):
    """sdpa_packed on a padding-free row of three chats equals each chat run alone and sdpa's block-diagonal mask,
    gradients included, without falling back to sdpa; with a KV cache it is sdpa (same greedy tokens)."""
    path = dict(zip(["original", "ladder"], tiny_pair))[which]
    packed_model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=PACKED_ATTENTION)
    sdpa_model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    lengths = [5, 11, 8]
    ids = torch.randint(3, 49152, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    row = {"input_ids": ids, "position_ids": positions, "labels": ids, "use_cache": False}

    assert sequence_starts(positions, sum(lengths)) == [0, 5, 16]
    with monkeypatch.context() as patch:
        patch.setattr(packed_attention, "sdpa_attention_forward", None)  # a fallback would fail here
        packed = packed_model(**row)
    sdpa = sdpa_model(**row)
    alone = torch.cat([sdpa_model(chunk).logits for chunk in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed.logits, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.logits, sdpa.logits, atol=1e-5, rtol=0)
    packed.loss.backward()
    sdpa.loss.backward()
    for (name, p), q in zip(packed_model.named_parameters(), sdpa_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)

    prompt = {"input_ids": ids[:, :6], "max_new_tokens": 8, "do_sample": False}
    assert torch.equal(packed_model.generate(**prompt), sdpa_model.generate(**prompt))


@pytest.mark.parametrize("answerer", ["original", "converted"])
def test_answers_are_the_models_own_greedy_answers(tiny_pair, tmp_path, capsys, answerer):
    """Self-distillation data (the original's answers) and on-policy data (the converted model's): every record keeps
    its prompt, and its answer is the model's greedy answer to it, the same batched (left-padded, sorted by length) as
    generated one by one."""
    model_dir = dict(zip(["original", "converted"], tiny_pair))[answerer]
    records = json.loads((REPO / "gates/data/alpaca_5000.json").read_text())[:5]
    (tmp_path / "data.json").write_text(json.dumps(records))
    command = [model_dir, tmp_path / "data.json", tmp_path / "answers.json", "--max-new-tokens", "12", "--batch-size", "3"]
    assert teacher_answers_main(list(map(str, command))) == 0
    answers = json.loads((tmp_path / "answers.json").read_text())
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert len(answers) == len(records)
    for record, answer in zip(records, answers):
        assert (answer["instruction"], answer["input"]) == (record["instruction"], record["input"])
        prompt = tokenizer.apply_chat_template(alpaca_chat(record)[:-1], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)  # fmt: skip
        new_tokens = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1] :]
        assert answer["output"] == tokenizer.decode(new_tokens, skip_special_tokens=True).strip() != record["output"]

    capsys.readouterr()
    assert teacher_answers_main([str(model_dir), str(tmp_path / "missing.json"), str(tmp_path / "out.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "out.json").exists()


def test_the_ramp_switches_the_ladder_layers_on_in_its_order_and_leaves_them_all_on(tiny_pair):
    """Progressive conversion: one ladder layer on from the first step, one more every third of the ramp, each a
    ladder layer exactly (the same logits as a model converted with just the layers on so far)."""
    _, ladder = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(ladder).eval()
    ramp = LadderRamp([model.model.layers[index] for index in (5, 3, 4)], tokens=900)
    ids = torch.randint(3, 49152, (2, 12))
    for tokens_seen, on in [(0, [5]), (299, [5]), (300, [3, 5]), (650, [3, 4, 5]), (5000, [3, 4, 5])]:
        ramp.on_step_begin(None, SimpleNamespace(num_input_tokens_seen=tokens_seen), None)
        wired = AutoModelForCausalLM.from_pretrained(ladder, ladder_layers=on).eval()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, wired(ids).logits), (tokens_seen, on)
    ramp.on_step_begin(None, SimpleNamespace(num_input_tokens_seen=0), None)
    ramp.on_train_end(None, None, None)
    assert all(layer.is_ladder for layer in model.model.layers[3:]) and not any(layer.is_ladder for layer in model.model.layers[:3])


def test_a_ramped_heal_logs_its_layers_on_and_saves_the_whole_ladder_model(tiny_pair, tmp_path):
    _, ladder = tiny_pair
    recipe = write_recipe(tmp_path / "r.yaml", ladder, tmp_path / "run", ladder_ramp=0.5, save_steps=100)
    result = sft(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "switched on one at a time over 750 tokens: [5, 4, 3]" in result.stdout  # no measured order: from the top
    state = read_json(Path(last_complete_checkpoint(str(tmp_path / "run"))) / "trainer_state.json")
    on = [entry["ladder_layers_on"] for entry in state["log_history"] if "loss" in entry]
    assert on == sorted(on) and set(on) == {1, 2, 3}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").config.ladder_layers == [3, 4, 5]


def test_the_ramp_refuses_a_fitted_model(tiny_pair, tmp_path, capsys):
    from ladder.adapt import sft as sft_script

    _, ladder = tiny_pair
    fitted = tmp_path / "fitted"
    shutil.copytree(ladder, fitted)
    provenance = read_json(fitted / "ladder_provenance.json") | {"fit": {"ridge": 0.01}}
    (fitted / "ladder_provenance.json").write_text(json.dumps(provenance))
    with pytest.raises(SystemExit) as exit_info:
        sft_script.main([str(write_recipe(tmp_path / "r.yaml", fitted, tmp_path / "run", ladder_ramp=0.25))])
    assert exit_info.value.code == 2 and "ladder_ramp needs a model converted without --fit" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [({"learning_rat": 1e-4}, "Unknown arguments from config file: ['--learning_rat'"),
     ({"train_layers": "some"}, "train_layers must be one of all, ladder, not 'some'"),
     ({"model_name_or_path": "/nowhere"}, "has no config.json: not a transformers checkpoint"),
     ({"datasets": [{"path": "json", "data_files": "/nowhere.json"}]}, "dataset file /nowhere.json does not exist"),
     ({"dataset_template": "none"}, "it needs 'messages', or 'prompt' and 'completion'"),
     ({"distill_alpha": 2}, "distill_alpha must be in [0, 1]"),
     ({"align_tokens": 1e9}, "align_tokens must be in [0, max_train_tokens]"),
     ({"align_inputs": "both"}, "align_inputs must be one of teacher, student"),
     ({"ladder_ramp": 0.25, "align_tokens": 0.5}, "ladder_ramp and align_tokens do not combine"),
     ({"ladder_ramp": 0.25, "ladder_ramp_order": [3, 4]}, "ladder_ramp_order [3, 4] must name each of the model's ladder layers [3, 4, 5] once"),
     ({"gate_after": "after_lunch"}, "gate 'after_lunch' is not in the gates file"),
     ({"max_train_tokens": "lots"}, "invalid float value: 'lots'"),
     ({"dry_run_processes": 0}, "dry_run_processes and dry_run_device_gb must be positive"),
     ({"dry_run": True, "launch_config": "/nowhere.yaml"}, "launch config /nowhere.yaml cannot be read"),
     ({"dry_run": True, "launch_config": str(REPO / "recipes/smollm2-135m.yaml")}, "distributed_type None is not"),
     ({"push_to_hub": True}, "push_to_hub would publish the model before its gate: publish the healed model with ladder-publish"),
     ({"dry_run": True, "dry_run_device_gb": 0.5}, "the run does not fit 0.5 GB per device (plan above)"),
     ({"lr_scheduler_type": "warmup_stable_decay"}, "warmup_stable_decay needs lr_scheduler_kwargs num_decay_steps")],
)  # fmt: skip
def test_bad_recipes_are_one_line_errors_before_any_model_loads(tiny_pair, tmp_path, override, message, capsys):
    from ladder.adapt import sft as sft_script

    _, ladder = tiny_pair
    with pytest.raises(SystemExit) as exit_info:
        sft_script.main([str(write_recipe(tmp_path / "r.yaml", ladder, tmp_path / "run", **override))])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("ladder-heal: error: ")]
    assert len(errors) == 1 and message in errors[0], captured.err[-2000:]
    assert "Loading weights" not in captured.err and not (tmp_path / "run").exists()


def test_a_constant_then_linear_schedule_decays_over_its_share_of_the_steps(tiny_pair, tmp_path):
    from ladder.adapt.recipe import decay_steps, parse_recipe

    _, ladder = tiny_pair
    recipe = parse_recipe([str(write_recipe(tmp_path / "r.yaml", ladder, tmp_path / "run", warmup_steps=0,
                                            lr_scheduler_type="warmup_stable_decay",
                                            lr_scheduler_kwargs={"num_decay_steps": 0.4, "decay_type": "linear"}))])  # fmt: skip
    args = recipe.training
    decay_steps(args, 10)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    schedule = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10,
                             scheduler_specific_kwargs=args.lr_scheduler_kwargs)  # fmt: skip
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0] / args.learning_rate)
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])


@pytest.mark.parametrize(
    "options, launch, total, verdict",
    [(["--dry-run"], "FSDP", "62.65", "80 GB: fits"),  # the recipe names its launch config: FSDP, 8 processes
     (["--dry-run", "--launch-config", "recipes/accelerate/zero3.yaml"], "ZeRO-3", "48.60", "80 GB: fits"),
     (["--dry_run", "true", "--dry_run_processes", "8", "--dry_run_launch", "recipes/accelerate/ddp.yaml"], "DDP",
      "107.86", "80 GB: does NOT fit (needs 108 GB)")],
)  # fmt: skip
def test_8b_recipe_dry_run_prints_the_plan_and_the_memory_per_gpu(options, launch, total, verdict):
    result = sft(REPO / "recipes/8b.yaml", *options)
    assert "plan: 300,000,000 tokens = 287 steps" in result.stdout
    assert "distill_alpha 1.0, no layer-wise alignment" in result.stdout
    assert f"memory plan per device: {launch}, 8 process(es), 80 GB each" in result.stdout
    [total_line] = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["total"]]
    assert total_line[1] == total and " ".join(total_line[4:]) == verdict
    fits = "NOT" not in verdict
    assert result.returncode == (0 if fits else 2), result.stderr[-2000:]
    assert fits or result.stderr == "ladder-heal: error: the run does not fit 80 GB per device (plan above)\n"


def test_help_lists_our_keys_with_their_choices_before_trls_without_a_recipe(capsys):
    from ladder.adapt import sft as sft_script

    assert sft_script.main(["--help"]) == 0
    ours, theirs = capsys.readouterr().out.split("TRL's keys")
    assert "--train_layers {all,ladder}, --train-layers {all,ladder}" in ours
    assert "--align-inputs {teacher,student}" in ours and "--dataset-template {none,alpaca,sharegpt}" in ours
    assert "--learning_rate" not in ours and "--learning_rate LEARNING_RATE" in theirs and "--lora_r" in theirs


def test_a_copied_recipe_runs_from_anywhere_and_a_recipe_names_its_files_relative_to_itself(
    tiny_pair, tmp_path, monkeypatch, capsys
):
    from ladder.adapt import sft as sft_script

    heal = REPO / ".venv/bin/ladder-heal"  # the console script, from a folder that is not the repository
    copied = subprocess.run([heal, "--copy-recipe", "smollm2-135m", tmp_path], capture_output=True, text=True, cwd="/")
    assert copied.returncode == 0 and copied.stdout == f"{tmp_path / 'smollm2-135m.yaml'}\n", copied.stderr
    recipe = yaml.safe_load((tmp_path / "smollm2-135m.yaml").read_text())
    assert [Path(d["data_files"]) for d in recipe["datasets"]] == [REPO / "gates/data/alpaca_5000.json",
                                                                   REPO / "gates/data/gsm8k_train_2000.json"]  # fmt: skip
    with pytest.raises(SystemExit):
        sft_script.main(["--copy-recipe", "smollm2-135m", str(tmp_path)])
    assert capsys.readouterr().err.endswith("smollm2-135m.yaml exists: choose another destination\n")

    _, ladder = tiny_pair  # a recipe in its own folder, its data beside it, run from elsewhere
    (tmp_path / "mine" / "data").mkdir(parents=True)
    shutil.copy(REPO / "gates/data/alpaca_5000.json", tmp_path / "mine" / "data" / "a.json")
    mine = write_recipe(tmp_path / "mine" / "r.yaml", ladder, tmp_path / "run", dry_run=True,
                        datasets=[{"path": "json", "data_files": "data/a.json", "split": "train[:20]"}])  # fmt: skip
    monkeypatch.chdir("/")
    assert sft_script.main([str(mine)]) == 0
    assert "memory plan per device: one process" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        sft_script.main([str(mine), "--gates-file", "gates.yaml"])  # the command line's: from here
    assert capsys.readouterr().err == "ladder-heal: error: gates file gates.yaml does not exist\n"


def test_default_recipe_never_trains_on_the_gates_heldout_rows():
    recipe = yaml.safe_load((REPO / "recipes/smollm2-135m.yaml").read_text())
    from ladder.gates.alpaca import HELDOUT

    alpaca = [d for d in recipe["datasets"] if d["data_files"].endswith("alpaca_5000.json")]
    assert [d["split"] for d in alpaca] == [f"train[:{HELDOUT.start}]"]
    assert any("gsm8k" in d["data_files"] for d in recipe["datasets"])


def test_two_process_ddp_on_cpu_with_lora_and_activation_checkpointing(tiny_pair, tmp_path):
    _, ladder = tiny_pair
    recipe = write_recipe(tmp_path / "r.yaml", ladder, tmp_path / "run", max_train_tokens=800, distill_alpha=0.5,
                          align_tokens=300, use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"],
                          activation_checkpointing=True)  # fmt: skip
    # accelerate's MULTI_CPU mode wants MPI on one machine; torchrun starts the same DDP processes (gloo on CPU).
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", SFT, recipe]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout
    assert read_json(tmp_path / "run" / "final" / "ladder_provenance.json")["adaptation"]["tokens"] >= 800


def test_smollm2_recipe_trains_the_real_model_and_gates_it(smollm2_dir, tmp_path):
    """The shipped recipe on real weights, shortened: every output is written and the after gate judges the result."""
    converted = convert(str(smollm2_dir), "15", tmp_path / "smollm2-ladder15")  # no gate: this test runs its own
    gates = tiny_gates(tmp_path / "gates.yaml")
    result = sft(REPO / "recipes/smollm2-135m.yaml", "--model_name_or_path", converted, "--output_dir", tmp_path / "run",
                 "--max_train_tokens", 600, "--max_length", 128, "--per_device_train_batch_size", 2,
                 "--gates_file", gates, "--gate_after", "sane", "--report_to", "none")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "run" / "final"
    report = read_json(final / "ladder_gate_sane.json")
    assert report["passed"] and report["reference"] == str(smollm2_dir)  # the provenance names the original
    provenance = read_json(final / "ladder_provenance.json")
    assert provenance["ladder_layers"] == list(range(15, 30)) and provenance["adaptation"]["tokens"] >= 600
    assert (final / "training_curves.png").is_file() and (final / "chat_template.jinja").is_file()
    assert PACKED_ATTENTION not in (final / "config.json").read_text()  # a training-time choice, not shipped
    healed = AutoModelForCausalLM.from_pretrained(final)
    assert healed.config.tie_word_embeddings and healed.config.ladder_layers == list(range(15, 30))
