"""`ladder-publish MODEL (--repo-id OWNER/NAME | --export DIR)`: a healed ladder model, out as a Hub repository or a
folder that any transformers user can load, with its evidence.

The output holds the safetensors shards (hardlinked when it can), `config.json` with `auto_map`, the modeling code,
the tokenizer, chat template and generation config, `ladder_provenance.json`, the gate reports, the base model's
license texts and a model card (`README.md`). A model whose gate report (`--gate`, default after_adapt) is missing or
failed is refused unless `--force`, which the card then states. The folder is built in a temporary directory beside
its target and renamed, or uploaded, at the end. Exit codes: 0 published, 1 refused by the gate, 2 bad input, an
existing target, or a Hub that is offline, unreachable or refusing, 130 interrupted, 3 an unexpected error.
"""

import argparse
import filecmp
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ladder import __version__
from ladder.checkpoint import (
    HUB_ID,
    MODEL_CODE_DIR,
    MODELING_FILES,
    PROVENANCE_FILE,
    SIDE_FILES,
    SOURCE_ORIGIN,
    CheckpointError,
    check_apart,
    check_tensors,
    check_output,
    copy_side_files,
    crashed,
    first_line,
    find_shards,
    link_or_copy,
    output_lock,
    read_json_object,
    read_ladder_config,
    read_provenance,
    scratch,
    shard_hashes,
    staged,
    tool_stamp,
    unwind_on_termination,
    write_ladder_config,
    write_provenance,
)
from ladder.gates import GateUsageError, load_gates_file, report
from ladder.gates.config import DEFAULT_GATES_FILE
from ladder.gates.report import Report, Row

from .card import (
    LICENSE_FILES,
    CardFacts,
    License,
    build_card,
    check_license_option,
    detect_license,
    tensor_parallel_size,
)

CONVERTED_GATE = "after_convert"  # the gate ladder-convert runs on the converted checkpoint
EVIDENCE_FILES = (*report.report_files(), "training_curves.png")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
HUB_TIMEOUT_S = 10


class PublishError(Exception):
    """An existing target, or the Hub: one line, exit code 2, and nothing left behind (as a CheckpointError, a bad
    model directory)."""


class GateRefused(Exception):
    """The gate report is missing or failed, and --force was not given: exit code 1, nothing written."""


@dataclass
class Checkpoint:
    directory: Path
    config: dict
    provenance: dict
    shards: list[str]


def publish(
    model: Path,
    repo_id: str | None = None,
    export: Path | None = None,
    gate: str = "after_adapt",
    force: bool = False,
    overwrite: bool = False,
    private: bool = False,
    base_model: str | None = None,
    license_id: str | None = None,
    gates_file: Path = DEFAULT_GATES_FILE,
    license_link: str | None = None,
) -> str:
    """Export to `export` or upload to `repo_id` (exactly one); returns the folder or the repository's URL."""
    target = Path(export).expanduser().absolute() if export else None
    if target and any(ord(c) < 32 for c in str(target)):  # the folder's name is the card's title
        raise PublishError(f"--export {str(target)!r} holds control characters (a newline, ...): choose another name")
    try:
        check_license_option(license_id, license_link)
    except ValueError as error:
        raise PublishError(str(error)) from None
    if repo_id:
        check_repo_id(repo_id)
        check_hub(repo_id, overwrite)
    else:
        check_output(target, overwrite, "--export")
    if base_model and not HUB_ID.fullmatch(base_model):
        raise PublishError(f"--base-model {base_model!r} is not a Hub model id (owner/name)")
    checkpoint = read_checkpoint(Path(model).expanduser().absolute())
    if target:
        check_apart(target, checkpoint.directory, "--export")
    thresholds = gate_thresholds(gates_file, gate)
    rows = judged_rows(checkpoint, gate, thresholds)
    problem = gate_problem(rows, gate)
    if problem and not force:
        raise GateRefused(f"{checkpoint.directory} is not published: {problem} (or pass --force)")

    converted, original = ancestors(checkpoint)
    license = detect_license([checkpoint.directory, *filter(None, (converted, original))], license_id, license_link)
    check_license_terms(license, repo_id.split("/")[1] if repo_id else None)
    facts = CardFacts(
        name=repo_id.split("/")[1] if repo_id else target.name,
        load_id=repo_id or target.name,  # the folder by its name: the card names no path of this machine
        base_model=base_model or hub_source(checkpoint.provenance) or origin_hub_id(checkpoint.provenance),
        source=str(checkpoint.provenance.get("source")),
        ladder_layers=checkpoint.config["ladder_layers"],
        num_layers=checkpoint.config["num_hidden_layers"],
        adaptation=checkpoint.provenance.get("adaptation") or {},
        gate=gate,
        gate_rows=rows,
        converted_rows=converted_rows(converted),
        forced_because=problem,
        license=license,
        chat_template=has_chat_template(checkpoint.directory),
        tensor_parallel=tensor_parallel_size(checkpoint.config),
        origin=checkpoint.provenance.get(SOURCE_ORIGIN),
        curves=(checkpoint.directory / "training_curves.png").is_file(),
    )

    warn_if_model_code_differs(checkpoint.directory)
    if target:
        with output_lock(target, "--export"):
            check_output(target, overwrite, "--export")  # again: a run of ours may have written it meanwhile
            with staged(target, overwrite=overwrite, option="--export") as folder:
                write_folder(checkpoint, converted, facts, folder)
        return str(target)
    with scratch(checkpoint.directory) as folder:  # beside the model: the shards hardlink, not copy, for the upload
        write_folder(checkpoint, converted, facts, folder)
        return upload(folder, repo_id, private, overwrite)


def check_repo_id(repo_id: str) -> None:
    if not HUB_ID.fullmatch(repo_id):
        raise PublishError(f"--repo-id {repo_id!r} is not a Hub repository id (owner/name)")


def check_hub(repo_id: str, overwrite: bool) -> None:
    """Before any work: offline mode, no token, a refused token, an unreachable Hub or an existing repository (without
    --overwrite) end the command."""
    from huggingface_hub import HfApi, constants, get_session, get_token, is_offline_mode
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    if is_offline_mode():
        raise PublishError("the Hugging Face Hub is off (HF_HUB_OFFLINE is set): publish to a folder with --export DIR")
    token = get_token()
    if token is None:
        raise PublishError("no Hugging Face token: set HF_TOKEN to a token that can write to the repository")
    with hub_errors(repo_id):
        # whoami with a timeout first: huggingface_hub's own calls have none, and would hang on a dead network
        whoami = f"{constants.ENDPOINT}/api/whoami-v2"
        hf_raise_for_status(get_session().get(whoami, headers=build_hf_headers(token=token), timeout=HUB_TIMEOUT_S))
        if not overwrite and HfApi().repo_exists(repo_id):
            raise PublishError(f"{repo_id} already exists on the Hub: pass --overwrite to replace its files")


def read_checkpoint(directory: Path) -> Checkpoint:
    if not directory.is_dir():
        raise PublishError(f"{directory}: no such directory")
    config = read_ladder_config(directory)
    provenance = read_provenance(directory)
    if not (directory / "tokenizer_config.json").is_file():
        raise PublishError(f"{directory} has no tokenizer (tokenizer_config.json): save the tokenizer beside the model")
    shards = find_shards(directory)
    check_tensors(directory, shards, config)
    recorded = provenance.get("shards_sha256")
    if not isinstance(recorded, dict) or sorted(recorded) != shards:
        raise CheckpointError(f"{directory / PROVENANCE_FILE} does not record the sha256 of each shard {shards}")
    return Checkpoint(directory, config, provenance, shards)


def gate_thresholds(gates_file: Path, gate: str) -> dict:
    try:
        gates = load_gates_file(gates_file).gates
    except GateUsageError as error:
        raise PublishError(str(error)) from None
    if gate not in gates:
        raise PublishError(f"--gate {gate} is not in {gates_file} (it defines: {', '.join(gates)})")
    return gates[gate]


def bound_report(directory: Path, provenance: dict, gate: str) -> Report | None:
    """The gate's report in `directory`, which must be about these weights (its shard hashes are the provenance's)
    and have measured something; None when there is none."""
    verdict = report.read(directory, gate)
    where = directory / report.report_files(gate)[0]
    if verdict and not verdict.rows:
        raise CheckpointError(f"{where} has no rows: it measured nothing")
    if verdict and verdict.shards_sha256 != provenance.get("shards_sha256"):
        raise CheckpointError(
            f"{where} is about other weights (its shard hashes are not the provenance's): run ladder-eval --gate {gate} on {directory}"
        )
    return verdict


def judged_rows(checkpoint: Checkpoint, gate: str, thresholds: dict) -> list[Row] | None:
    """The report's measurements judged again by the gates file, so the verdict written in the report counts for
    nothing. None without a report."""
    verdict = bound_report(checkpoint.directory, checkpoint.provenance, gate)
    if verdict is None:
        return None
    measured = {row.metric: (row.reference, row.candidate, row.reference_stderr, row.candidate_stderr)
                for row in verdict.rows if row.threshold != "not measured"}  # fmt: skip
    return report.judge(measured, thresholds)


def gate_problem(rows: list[Row] | None, gate: str) -> str | None:
    """Why the gate keeps the model in; None when it lets it out."""
    if rows is None:
        return f"its {gate} gate report ({report.report_files(gate)[0]}) is missing"
    if report.failing(rows):
        return f"its {gate} gate failed on: {', '.join(report.failing(rows))}"
    return None


def converted_rows(converted: Path | None) -> list[Row] | None:
    """The converted ancestor's after_convert rows, for the card: shown as measured, and only about its weights."""
    verdict = bound_report(converted, read_provenance(converted), CONVERTED_GATE) if converted else None
    return verdict.rows if verdict else None


def hub_source(provenance: dict) -> str | None:
    """The original's Hub id; None when it was converted from a local directory."""
    source = provenance.get("source")
    return source if isinstance(source, str) and HUB_ID.fullmatch(source) else None


def origin_hub_id(provenance: dict) -> str | None:
    """The Hub model a local original was made from (a dequantized GGUF), as ladder-convert recorded it."""
    hub_id = (provenance.get(SOURCE_ORIGIN) or {}).get("hub_id")
    return hub_id if isinstance(hub_id, str) and HUB_ID.fullmatch(hub_id) else None


def ancestors(checkpoint: Checkpoint) -> tuple[Path | None, Path | None]:
    """The converted checkpoint the model was healed from, and the original, where they are directories here.

    The provenance records them as given to the tools: a relative path resolves against the current directory.
    """
    converted = (checkpoint.provenance.get("adaptation") or {}).get("converted_model")
    return existing_directory(converted), existing_directory(checkpoint.provenance.get("source"))


def existing_directory(name: object) -> Path | None:
    path = Path(name).expanduser() if isinstance(name, str) else None
    return path if path and path.is_dir() else None


def check_license_terms(license: License, model_name: str | None) -> None:
    """A Llama 3.x Community License travels with the weights, and names a model published on the Hub."""
    version = license.llama_version
    if not version:
        return
    if not any(path.name.startswith("LICENSE") for path in license.files):
        raise PublishError(
            f"the Llama {version} Community License must ship with the weights: put it (LICENSE) in the model directory"
        )
    if model_name is not None and not model_name.lower().startswith("llama"):
        raise PublishError(
            f"the Llama {version} Community License wants the name of a model derived from Llama to begin with "
            f'"Llama": call the repository Llama-{model_name}, for example'
        )


def has_chat_template(directory: Path) -> bool:
    tokenizer_config = read_json_object(directory / "tokenizer_config.json", "no tokenizer")
    return "chat_template" in tokenizer_config or any((directory / name).is_file() for name in CHAT_TEMPLATE_FILES)


def write_folder(checkpoint: Checkpoint, converted: Path | None, facts: CardFacts, target: Path) -> None:
    """Everything beside the card comes from the checkpoint first, then from its converted ancestor."""
    for name in checkpoint.shards:
        link_or_copy(checkpoint.directory / name, target / name)
    exported = shard_hashes(target, checkpoint.shards)
    changed = [name for name in checkpoint.shards if exported[name] != checkpoint.provenance["shards_sha256"][name]]
    if changed:  # edited since it was gated, or while this run reads the folder: the export would mix the two
        raise CheckpointError(f"{checkpoint.directory / changed[0]} is not the shard the provenance records (sha256 differs)")
    copy_side_files(checkpoint.directory, target, ("model.safetensors.index.json", *SIDE_FILES, *EVIDENCE_FILES))
    if converted:
        copy_side_files(converted, target, report.report_files(CONVERTED_GATE))
    if facts.license.files:  # all from one directory
        copy_side_files(facts.license.files[0].parent, target, LICENSE_FILES)
    if facts.license.needs_notice:
        (target / "NOTICE").write_text(facts.license.llama_notice + "\n")
    # Our own model code, the code the gates ran (ladder-eval loads our registered classes), whatever the folder holds.
    write_ladder_config(target, checkpoint.config, checkpoint.config["ladder_layers"])
    publication = {
        "name": facts.load_id,
        "base_model": facts.base_model,
        "license": facts.license.hub_id,
        "gate": facts.gate,
        "forced": facts.forced_because,
    }
    write_provenance(target, checkpoint.provenance | {"publication": publication | tool_stamp("ladder-publish")})
    build_card(facts).save(target / "README.md")


def warn_if_model_code_differs(directory: Path) -> None:
    """Code beside the weights that is not ours was never gated: it is left out, and the user told so."""
    for name in MODELING_FILES:
        theirs = directory / name
        if theirs.is_file() and not filecmp.cmp(theirs, MODEL_CODE_DIR / name, shallow=False):
            print(f"ladder-publish: warning: {theirs} differs from this ladder's model code and is not published: "
                  "the export ships the code the gates ran", file=sys.stderr)  # fmt: skip


def upload(folder: Path, repo_id: str, private: bool, overwrite: bool) -> str:
    """Create the repository (or, with --overwrite, reuse it), then upload the folder."""
    from huggingface_hub import HfApi  # reads HF_TOKEN itself

    api = HfApi()
    with hub_errors(repo_id):
        # None, not False: without --private the namespace's default visibility applies
        url = api.create_repo(repo_id, private=private or None, exist_ok=overwrite)  # 409 if created meanwhile
        if overwrite and private:  # an existing repository keeps its visibility through create_repo
            api.update_repo_settings(repo_id, private=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=f"ladder-publish {__version__}",
            delete_patterns="*" if overwrite else None,  # the repository then holds exactly this folder
        )
    return str(url)


@contextmanager
def hub_errors(repo_id: str):
    """huggingface_hub's and its HTTP client's exceptions, as one-line PublishErrors."""
    import httpx2  # huggingface_hub's HTTP client: its transport errors are not huggingface_hub's own
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 409:  # created meanwhile
            raise PublishError(f"{repo_id} already exists on the Hub: pass --overwrite to replace its files") from None
        if status in (401, 403):
            raise PublishError(f"{repo_id}: the Hub refused the token (HF_TOKEN): {first_line(error)}") from None
        raise PublishError(f"{repo_id}: the Hub answered {first_line(error)}") from None
    except httpx2.HTTPError as error:
        raise PublishError(
            f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({error}): publish with --export DIR"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder-publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the healed checkpoint directory (e.g. runs/NAME-adapted/final)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", help="Hub repository to create and upload to (owner/name); token from HF_TOKEN")
    target.add_argument("--export", type=Path, help="folder to write instead (works offline)")
    parser.add_argument("--private", action="store_true", help="make the Hub repository private")
    parser.add_argument("--gate", default="after_adapt", help="gate whose passed report lets the model out")
    parser.add_argument("--gates-file", type=Path, default=DEFAULT_GATES_FILE,
                        help="thresholds the report is judged by (default: gates' own)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="publish without a passed gate report (the card says so)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder or Hub repository")
    parser.add_argument("--base-model", help="the original's Hub id, when the provenance names a local directory")
    parser.add_argument("--license", help="the base model's Hub license id, when its files do not say it")
    parser.add_argument("--license-link", help="with --license other: the address of the license's text")
    args = parser.parse_args(argv)
    try:
        with unwind_on_termination():
            published = publish(
                args.model, args.repo_id, args.export, args.gate, args.force, args.overwrite, args.private,
                args.base_model, args.license, args.gates_file, args.license_link,
            )  # fmt: skip
    except GateRefused as refusal:
        print(f"ladder-publish: {refusal}", file=sys.stderr)
        return 1
    except (PublishError, CheckpointError, OSError) as error:
        print(f"ladder-publish: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "ladder-publish: interrupted; no export folder was written (a Hub upload may be partial)", file=sys.stderr
        )
        return 130
    except Exception as error:  # a bug of ours, or an environment we did not foresee
        return crashed("ladder-publish", error)
    print(published)
    return 0


if __name__ == "__main__":
    sys.exit(main())
