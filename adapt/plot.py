"""A PNG of the training: loss against tokens, and the gate's fidelity metrics before and after."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(log_history: list[dict], before, after, targets: dict[str, float], path: Path) -> None:
    """`targets`: the after-gate's KL ceiling and top-1 floor (`gates.config.fidelity_targets`), drawn as lines."""
    logged = [entry for entry in log_history if "loss" in entry and "num_input_tokens_seen" in entry]
    tokens = [entry["num_input_tokens_seen"] for entry in logged]
    final_tokens = max(tokens, default=0)
    figure, (loss_axis, gate_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot(tokens, [entry["loss"] for entry in logged], label="training loss")
    if any("distill_kl" in entry for entry in logged):
        loss_axis.plot(tokens, [entry.get("distill_kl") for entry in logged], label="KL(teacher || student)")
    loss_axis.set(xlabel="tokens trained", ylabel="per token", title="training")
    loss_axis.legend()
    for verdict, at, marker in ((before, 0, "o"), (after, final_tokens, "s")):
        for row in verdict.rows if verdict else []:
            if row.metric in ("kl", "top1_agreement"):
                gate_axis.scatter([at], [row.candidate], marker=marker, label=f"{row.metric} at {at:,} tokens")
    for target in targets.values():
        gate_axis.axhline(target, color="grey", linestyle=":", linewidth=1)
    gate_axis.set(xlabel="tokens trained", title="held-out fidelity (gate)")
    gate_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
