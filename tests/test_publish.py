"""`ladder-publish`: a healed tiny ladder model exported and loaded where our package is not importable, refused by a
missing or failed gate unless --force, and uploaded to a local stand-in for the Hub API."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import torch
from conftest import leftovers, read_json, save_tiny_checkpoint, tiny_llama, tiny_tokenizer, write_gate_report
from huggingface_hub import ModelCard, ModelCardData, constants
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import AutoModelForCausalLM

from ladder.checkpoint import MODEL_CODE_DIR, MODELING_FILES, ORIGIN_FILE, PROVENANCE_FILE, find_shards, shard_hashes
from ladder.convert.converter import convert
from ladder.publish import cli
from ladder.gates import load_gates_file, report
from ladder.publish.card import License, detect_license, tensor_parallel_size

APACHE_LICENSE = "Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n"
LLAMA_LICENSE = "LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\nLlama 3.1 Version Release Date: July 23, 2024\n"
BASE_MODEL = "my-org/Tiny-Llama"
TRAINING_DATA = [
    {"path": "tatsu-lab/alpaca", "name": None, "data_dir": None, "data_files": None, "split": "train", "columns": None},
    {"path": "json", "data_files": "gates/data/alpaca_5000.json", "split": "train[:4500]"},
]


@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> SimpleNamespace:
    """A tiny original (Apache-2.0), its conversion (3 ladder layers of 6), and a 'healed' model: the converted
    weights nudged and saved with save_pretrained, as adapt/sft.py saves them, with both gate reports."""
    work = tmp_path_factory.mktemp("publish")
    original = save_tiny_checkpoint(work / "tiny-original", tiny_llama())
    tiny_tokenizer().save_pretrained(original)
    (original / "LICENSE").write_text(APACHE_LICENSE)
    converted = convert(str(original), "3", work / "tiny-ladder3")
    write_gate_report(converted, "after_convert", kl=1.6)

    adapted = work / "tiny-ladder3-adapted" / "final"
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(adapted, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(adapted)
    adaptation = {"converted_model": str(converted), "reference": str(original), "data": TRAINING_DATA}
    provenance = read_json(converted / PROVENANCE_FILE) | {"adaptation": adaptation | {"tokens": 1500, "steps": 8}}
    provenance["shards_sha256"] = shard_hashes(adapted, find_shards(adapted))
    (adapted / PROVENANCE_FILE).write_text(json.dumps(provenance))
    write_gate_report(adapted, "after_adapt", kl=0.02)
    return SimpleNamespace(original=original, converted=converted, adapted=adapted, model=model.eval())


@pytest.fixture
def healed_copy(lineage, tmp_path) -> Path:
    """A private copy of the healed model, to break."""
    return Path(shutil.copytree(lineage.adapted, tmp_path / "copy" / "final"))


def publish(*args, capsys) -> tuple[int, str]:
    code = cli.main([str(arg) for arg in args])
    return code, capsys.readouterr().err.strip()


def assert_one_line(err: str, *fragments: str) -> None:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err


def test_export_loads_without_our_package_with_the_same_logits(lineage, tmp_path, capsys):
    export = tmp_path / "dist" / "tiny-ladder3"
    code, err = publish(lineage.adapted, "--export", export, "--base-model", BASE_MODEL, capsys=capsys)
    assert code == 0, err

    shards = sorted(p.name for p in lineage.adapted.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in export.glob("*.safetensors")) == shards
    assert all((export / name).stat().st_ino == (lineage.adapted / name).stat().st_ino for name in shards)
    for name in (*MODELING_FILES, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "LICENSE", "ladder_gate_after_adapt.md", "ladder_gate_after_convert.json"):  # fmt: skip
        assert (export / name).is_file(), name
    assert read_json(export / "config.json")["auto_map"]["AutoModelForCausalLM"].startswith("modeling_ladder_llama.")
    provenance = read_json(export / PROVENANCE_FILE)
    assert provenance["adaptation"]["tokens"] == 1500 and provenance["publication"]["forced"] is None
    assert not leftovers(export.parent)

    card = ModelCard.load(export / "README.md")
    assert card.data.base_model == BASE_MODEL and card.data.license == "apache-2.0"
    assert card.data.datasets == ["tatsu-lab/alpaca"]  # the local JSON file has no Hub id
    assert "ladder-residual" in card.data.tags
    assert "| metric | original | converted | adapted | threshold | pass |" in card.text
    assert "| kl | 0.0000 | 1.6000 | 0.0200 | ≤ 0.05 | yes |" in card.text
    assert "Layers 3-5 (3 of its 6 decoder layers)" in card.text and "1,500" in card.text
    assert "trust_remote_code=True" in card.text and "import ladder" in card.text
    assert "--force" not in card.text

    ids = torch.tensor([[1, 5, 9, 33, 60, 2]])
    with torch.no_grad():
        logits = lineage.model(ids).logits
    # A fresh process in which our packages cannot be imported: only the shipped remote code can build the model.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ladder"] = None  # makes `import ladder` fail
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(export)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save({{"logits": model(torch.tensor({ids.tolist()})).logits}}, {str(tmp_path / "remote.pt")!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / "remote.pt", weights_only=True)["logits"], logits)


def test_the_card_carries_a_model_index_the_recipe_and_usage_and_names_no_local_path(healed_copy, tmp_path, capsys):
    """A model healed from a dequantized GGUF (its provenance says so), with standard errors in its report and its
    recipe's settings: the card's metadata round-trips through huggingface_hub as the Hub reads it."""
    provenance = read_json(healed_copy / PROVENANCE_FILE)
    provenance["source_origin"] = {"hub_id": "my-org/Tiny-Llama", "dequantized_from": "tiny.Q4_1.gguf",
                                   "quantization": "Q4_1", "package": "llm-tiny==0.1"}  # fmt: skip
    provenance["adaptation"]["settings"] = {"learning_rate": 3e-4, "align_tokens": 100000.0, "output_dir": str(tmp_path)}
    (healed_copy / PROVENANCE_FILE).write_text(json.dumps(provenance))
    measured = {"kl": (0.0, 0.02, 0.0, 0.004), "top1_agreement": (1.0, 0.96, 0.0, 0.01),
                "response_perplexity": (2.0, 2.02, 0.1, 0.1), "arc_easy_local/acc": (0.5, 0.49, 0.022, 0.0224)}  # fmt: skip
    rows = report.judge(measured, load_gates_file().gates["after_adapt"])
    report.write(healed_copy, "after_adapt", rows, {"candidate": str(healed_copy), "reference": "tiny-original",
                 "shards_sha256": provenance["shards_sha256"]})  # fmt: skip
    (healed_copy / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    export = tmp_path / "dist" / "tiny-ladder3"
    code, err = publish(healed_copy, "--export", export, capsys=capsys)  # no --base-model: the origin names it
    assert code == 0, err

    text = (export / "README.md").read_text()
    metadata = metadata_load(export / "README.md")
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "tiny-ladder3" and metadata["base_model"] == "my-org/Tiny-Llama"
    assert [(r.metric_type, r.metric_value, r.dataset_type, r.dataset_config) for r in results] == [
        ("kl", 0.02, "tatsu-lab/alpaca", None), ("top1_agreement", 0.96, "tatsu-lab/alpaca", None),
        ("response_perplexity", 2.02, "tatsu-lab/alpaca", None), ("acc", 0.49, "allenai/ai2_arc", "ARC-Easy")]  # fmt: skip
    assert ModelCardData(**metadata).to_dict() == metadata  # what ModelCard.load reads is what was written
    assert ModelCard.load(export / "README.md").data.eval_results == results
    assert "| arc_easy_local/acc | 0.5000 ± 0.0220 | 0.5000 | 0.4900 ± 0.0224 | drop ≤ 1 + 2 SE (6.3) | yes |" in text
    assert "dequantized from a Q4_1 GGUF file (`tiny.Q4_1.gguf` in the PyPI package `llm-tiny==0.1`)" in text
    assert "| `learning_rate` | 0.0003 |" in text and "output_dir" not in text  # settings, never a path
    assert "tensor_parallel_size=2" in text and "--tp 2" in text  # 4 heads, 2 KV heads: TP 1 or 2
    assert "![training curves](training_curves.png)" in text and (export / "training_curves.png").is_file()
    assert "@misc{zhang2025ladder" in text and "eprint = {2501.06589}" in text
    assert str(tmp_path) not in text and "/tmp" not in text  # not a path of the machine that built it


def test_ladder_convert_records_what_a_local_original_was_made_from(lineage, tmp_path):
    original = Path(shutil.copytree(lineage.original, tmp_path / "original"))
    origin = {"hub_id": "my-org/Tiny-Llama", "dequantized_from": "tiny.Q4_1.gguf"}
    (original / ORIGIN_FILE).write_text(json.dumps(origin))
    converted = convert(str(original), "3", tmp_path / "converted")
    assert read_json(converted / PROVENANCE_FILE)["source_origin"] == origin
    assert "source_origin" not in read_json(lineage.converted / PROVENANCE_FILE)  # only where the original says it


def test_the_tensor_parallel_size_gives_every_rank_whole_heads():
    smollm2 = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    llama_8b = {"num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336}
    assert tensor_parallel_size(smollm2) == 3 and tensor_parallel_size(llama_8b) == 8
    assert tensor_parallel_size({"num_attention_heads": 7, "intermediate_size": 64}) == 1


def test_missing_or_failed_gate_refuses_and_force_publishes(healed_copy, tmp_path, capsys):
    export = tmp_path / "out"
    (healed_copy / "ladder_gate_after_adapt.json").unlink()
    code, err = publish(healed_copy, "--export", export, capsys=capsys)
    assert code == 1
    assert_one_line(err, "after_adapt gate report (ladder_gate_after_adapt.json) is missing", "--force")

    write_gate_report(healed_copy, "after_adapt", kl=0.5)
    code, err = publish(healed_copy, "--export", export, capsys=capsys)
    assert code == 1
    assert_one_line(err, "after_adapt gate failed on: kl")
    assert not export.exists() and not leftovers(tmp_path)

    for name in MODELING_FILES:  # a checkpoint saved without `import ladder`: the package supplies the code
        (healed_copy / name).unlink()
    code, err = publish(healed_copy, "--export", export, "--force", capsys=capsys)
    assert code == 0, err
    assert all((export / name).is_file() for name in MODELING_FILES)
    card = ModelCard.load(export / "README.md")
    assert "Published with `--force`" in card.text and "after_adapt gate failed on: kl" in card.text
    assert "| kl | 0.0000 | 1.6000 | 0.5000 | ≤ 0.05 | **NO** |" in card.text
    assert read_json(export / PROVENANCE_FILE)["publication"]["forced"].endswith("failed on: kl")


def test_existing_export_is_refused_without_overwrite(lineage, tmp_path, capsys):
    export = tmp_path / "out"
    export.mkdir()
    (export / "keep.txt").write_text("mine")
    code, err = publish(lineage.adapted, "--export", export, capsys=capsys)
    assert code == 2
    assert_one_line(err, "already exists", "--overwrite")
    assert [p.name for p in export.iterdir()] == ["keep.txt"]

    # --overwrite never deletes what ladder did not write; an earlier export it replaces.
    code, err = publish(lineage.adapted, "--export", export, "--overwrite", capsys=capsys)
    assert code == 2
    assert_one_line(err, "holds files ladder did not write", "refusing to delete them")
    (export / "keep.txt").unlink()
    for _ in range(2):
        code, err = publish(lineage.adapted, "--export", export, "--overwrite", capsys=capsys)
        assert code == 0, err
        assert (export / "README.md").is_file() and not leftovers(tmp_path)


def break_model(directory: Path, how: str) -> Path:
    if how == "missing":
        return directory.parent / "nowhere"
    if how == "no provenance":
        (directory / PROVENANCE_FILE).unlink()
    elif how == "no tokenizer":
        (directory / "tokenizer_config.json").unlink()
    elif how == "truncated shard":
        shard = sorted(directory.glob("*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-10])
    elif how == "bad report":
        (directory / "ladder_gate_after_adapt.json").write_text('{"passed": "yes"}')
    return directory


@pytest.mark.parametrize(
    "how, message",
    [("missing", "no such directory"), ("no provenance", "has no ladder_provenance.json"),
     ("no tokenizer", "has no tokenizer"), ("truncated shard", "truncated or corrupted"),
     ("bad report", "is not a gate report")],
)  # fmt: skip
def test_bad_input_is_one_line_errors(healed_copy, tmp_path, how, message, capsys):
    export = tmp_path / "out"
    code, err = publish(break_model(healed_copy, how), "--export", export, capsys=capsys)
    assert code == 2
    assert_one_line(err, "ladder-publish: error: ", message)
    assert not export.exists() and not leftovers(tmp_path) and not leftovers(healed_copy.parent)


def test_an_export_overlapping_the_model_is_refused_and_nothing_is_deleted(healed_copy, capsys):
    before = sorted(p.name for p in healed_copy.iterdir())
    for export in (healed_copy.parent, healed_copy, healed_copy / "dist"):  # its folder, itself (ours), inside it
        code, err = publish(healed_copy, "--export", export, "--overwrite", "--force", capsys=capsys)
        assert code == 2
        assert_one_line(err, "holds files ladder did not write" if export == healed_copy.parent else "lies inside the source")
    assert sorted(p.name for p in healed_copy.iterdir()) == before


def test_model_code_beside_the_weights_is_not_published(healed_copy, tmp_path, capsys):
    """Only the package's own model code, the code the gates ran, goes out with the weights."""
    (healed_copy / "modeling_ladder_llama.py").write_text("import os  # a payload\n")
    code, err = publish(healed_copy, "--export", tmp_path / "out", "--force", capsys=capsys)
    assert code == 0 and "modeling_ladder_llama.py differs from this ladder's model code" in err
    ours = MODEL_CODE_DIR / "modeling_ladder_llama.py"
    assert (tmp_path / "out" / "modeling_ladder_llama.py").read_text() == ours.read_text()


def test_a_plain_llama_is_not_a_ladder_checkpoint(lineage, tmp_path, capsys):
    code, err = publish(lineage.original, "--export", tmp_path / "out", capsys=capsys)
    assert code == 2
    assert_one_line(err, "not a ladder checkpoint", "'llama'")


def test_llama_license_attribution(healed_copy, tmp_path, capsys):
    (healed_copy / "LICENSE").write_text(LLAMA_LICENSE)
    export = tmp_path / "out"
    code, err = publish(healed_copy, "--export", export, capsys=capsys)
    assert code == 0, err
    card = ModelCard.load(export / "README.md")
    assert card.data.license == "llama3.1"
    assert card.text.lstrip().startswith("# out\n\n**Built with Llama**")
    notice = "Llama 3.1 is licensed under the Llama 3.1 Community License, Copyright © Meta Platforms, Inc."
    assert notice in card.text and notice in (export / "NOTICE").read_text()
    assert (export / "LICENSE").read_text() == LLAMA_LICENSE

    license = detect_license([healed_copy])
    with pytest.raises(cli.PublishError, match='begin with "Llama"'):
        cli.check_license_terms(license, "Tiny-Ladder3")
    cli.check_license_terms(license, "Llama-3.1-Tiny-Ladder3")


def test_unknown_license_is_stated(tmp_path):
    license = detect_license([tmp_path])
    assert license == License("unknown")
    assert cli.check_license_terms(license, "anything") is None


# The Hub, stood in for by a local server that speaks just the endpoints ladder-publish calls.


class FakeHub(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.url = f"http://127.0.0.1:{self.server_port}"
        self.repos: dict[str, dict] = {}  # repo id -> {"visibility": ..., "files": {path: bytes}}
        self.authorizations: set[str | None] = set()


class FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):
        pass

    def reply(self, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route(self) -> tuple[str, bytes]:
        self.server.authorizations.add(self.headers.get("Authorization"))
        return urlparse(self.path).path, self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        path, _ = self.route()
        if path == "/api/whoami-v2":
            return self.reply(200, {"name": "tester", "type": "user"})
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)", path):
            if match[1] not in self.server.repos:
                return self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return self.reply(200, {"id": match[1], "private": self.server.repos[match[1]]["visibility"] == "private"})
        if match := re.fullmatch(r"/api/models/(.+)/tree/main", path):
            files = self.server.repos[match[1]]["files"]
            tree = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for p, b in files.items()]
            return self.reply(200, tree)
        self.reply(404, {"error": f"GET {path} is not in the stand-in"})

    def do_PUT(self):
        path, body = self.route()
        if match := re.fullmatch(r"/api/models/(.+)/settings", path):
            self.server.repos[match[1]]["visibility"] = json.loads(body)["visibility"]
            return self.reply(200, {})
        self.reply(404, {"error": f"PUT {path} is not in the stand-in"})

    def do_POST(self):
        path, body = self.route()
        repos = self.server.repos
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"{self.server.url}/{repo_id}"
            if repo_id in repos:
                return self.reply(409, {"error": "You already created this model repo", "url": url})
            repos[repo_id] = {"visibility": payload.get("visibility"), "files": {}}
            return self.reply(200, {"url": url})
        if path == "/api/validate-yaml":
            return self.reply(200, {})
        if re.fullmatch(r"/api/models/(.+)/preupload/main", path):  # every file a regular blob: no LFS, no Xet
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in json.loads(body)["files"]]
            return self.reply(200, {"files": files})
        if match := re.fullmatch(r"/api/models/(.+)/commit/main", path):
            files = repos[match[1]]["files"]
            for item in map(json.loads, body.splitlines()):
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"])
            return self.reply(200, {"commitUrl": f"{self.server.url}/{match[1]}/commit/1", "commitOid": "1" * 40,
                                    "pullRequestUrl": None})  # fmt: skip
        self.reply(404, {"error": f"POST {path} is not in the stand-in"})


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def hub_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    return env | {"HF_TOKEN": "hf_test", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"} | overrides


def run_cli(*args, env: dict) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    ladder_publish = Path(sys.executable).with_name("ladder-publish")
    return subprocess.run([ladder_publish, *map(str, args)], capture_output=True, text=True, env=env)


def test_hub_upload_to_a_local_stand_in(lineage, fake_hub, tmp_path, monkeypatch, capsys):
    before = sorted(lineage.adapted.parent.iterdir())
    result = run_cli(lineage.adapted, "--repo-id", "my-org/Tiny-Ladder3", "--private",
                     env=hub_env(HF_ENDPOINT=fake_hub.url))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{fake_hub.url}/my-org/Tiny-Ladder3"
    repo = fake_hub.repos["my-org/Tiny-Ladder3"]
    assert repo["visibility"] == "private" and fake_hub.authorizations == {"Bearer hf_test"}
    for shard in lineage.adapted.glob("*.safetensors"):
        assert repo["files"][shard.name] == shard.read_bytes()
    for name in (*MODELING_FILES, "config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json",
                 PROVENANCE_FILE, "ladder_gate_after_adapt.json", "ladder_gate_after_convert.md", "LICENSE"):  # fmt: skip
        assert name in repo["files"], name
    card = ModelCard(repo["files"]["README.md"].decode())
    assert 'model_id = "my-org/Tiny-Ladder3"\n' in card.text and "from_pretrained(model_id, trust_remote_code=True)" in card.text
    assert sorted(lineage.adapted.parent.iterdir()) == before  # the staging folder is gone

    # In this process from here: huggingface_hub read HF_ENDPOINT at import, so point its constant at the stand-in.
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    code, err = publish(lineage.adapted, "--repo-id", "my-org/Tiny-Ladder3", capsys=capsys)
    assert code == 2
    assert_one_line(err, "my-org/Tiny-Ladder3 already exists on the Hub", "--overwrite")

    repo["files"]["model.safetensors"] = b"stale weights that would shadow the new shards"
    repo["visibility"] = "public"
    code, err = publish(lineage.adapted, "--repo-id", "my-org/Tiny-Ladder3", "--overwrite", "--private", capsys=capsys)
    assert code == 0, err
    assert "model.safetensors" not in repo["files"] and repo["visibility"] == "private"


def test_offline_hub_publish_fails_before_any_work(lineage):
    before = sorted(lineage.adapted.parent.iterdir())
    result = run_cli(lineage.adapted, "--repo-id", "my-org/Tiny-Ladder3", env=hub_env(HF_HUB_OFFLINE="1"))
    assert result.returncode == 2
    assert_one_line(result.stderr.strip(), "HF_HUB_OFFLINE", "--export")
    assert sorted(lineage.adapted.parent.iterdir()) == before


@pytest.mark.parametrize("problem", ["unreachable", "no token", "bad repo id"])
def test_hub_problems_are_one_line_errors_before_any_work(lineage, problem, monkeypatch, capsys):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    if problem == "no token":
        monkeypatch.delenv("HF_TOKEN")
    repo_id = "not a repo id" if problem == "bad repo id" else "my-org/Tiny-Ladder3"
    before = sorted(lineage.adapted.parent.iterdir())
    code, err = publish(lineage.adapted, "--repo-id", repo_id, capsys=capsys)
    assert code == 2
    assert_one_line(err, {"unreachable": "cannot be reached", "no token": "set HF_TOKEN", "bad repo id": "owner/name"}[problem])
    assert sorted(lineage.adapted.parent.iterdir()) == before
