"""Tensor-parallel inference of Ladder Llama checkpoints, with each ladder module's all-reduce overlapped with the next
module's compute, and the benchmark that measures it (`python -m ladder.serve generate|bench`)."""
