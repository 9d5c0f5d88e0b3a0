"""Layer-wise alignment (adapt/alignment.py) on tiny random Llamas: the loss, the forcing, and that it trains."""

import torch
from conftest import ladder_twin, tiny_llama

from ladder.adapt.alignment import LayerAligner

LADDER = [3, 4, 5]


def aligned(student, original, layers, inputs="teacher", ids=None):
    ids = torch.randint(3, 96, (2, 17), generator=torch.Generator().manual_seed(1)) if ids is None else ids
    aligner = LayerAligner(student, original, layers, inputs)
    return aligner, *aligner.loss(student, {"input_ids": ids, "use_cache": False})


def test_the_loss_is_zero_for_the_original_itself_and_positive_once_rewired():
    original = tiny_llama()
    _, loss, per_layer = aligned(ladder_twin(original, []), original, range(6))  # every layer, none rewired
    assert loss.item() == 0 and per_layer == dict.fromkeys(range(6), 0.0)
    _, loss, per_layer = aligned(ladder_twin(original, LADDER), original, LADDER)
    assert loss.item() > 0 and all(value > 0 for value in per_layer.values()) and set(per_layer) == set(LADDER)


def test_teacher_forced_inputs_are_the_originals_hidden_states():
    original = tiny_llama()
    ids = torch.randint(3, 96, (2, 17))
    aligner, _, _ = aligned(ladder_twin(original, LADDER), original, LADDER, ids=ids)
    with torch.no_grad():
        hidden_states = original(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    for index in LADDER:
        H, A = aligner.streams.streams_before(index)
        assert torch.equal(H, hidden_states[index])
        # A entering a layer is the previous layer's post-attention residual: h_(i-1) + attn(ln1(h_(i-1))).
        previous = original.model.layers[index - 1]
        assert torch.allclose(A, hidden_states[index] - previous.mlp(previous.post_attention_layernorm(A)), atol=1e-5)


def test_teacher_forcing_feeds_each_layer_the_originals_streams_and_student_inputs_do_not():
    original = tiny_llama()
    student = ladder_twin(original, LADDER)
    _, _, forced = aligned(student, original, LADDER, "teacher")
    _, _, own = aligned(student, original, LADDER, "student")
    assert forced[3] == own[3]  # the first ladder layer's inputs come from standard layers: the same either way
    assert forced[4] != own[4] and forced[5] != own[5]  # later ones see the original's streams, or their own errors


def test_alignment_steps_train_only_the_aligned_layers_and_reduce_the_loss():
    original = tiny_llama()
    student = ladder_twin(original, LADDER).train()
    ids = torch.randint(3, 96, (4, 33), generator=torch.Generator().manual_seed(0))
    aligner = LayerAligner(student, original, LADDER)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-4)
    losses = []
    for _ in range(20):
        loss, _ = aligner.loss(student, {"input_ids": ids, "use_cache": False})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, losses
    for name, parameter in student.named_parameters():
        assert (parameter.grad is not None) == any(f"layers.{i}." in name for i in LADDER), name
