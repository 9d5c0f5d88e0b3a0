"""The Ladder Llama model (two files that also ship beside every checkpoint as remote code), `ladder-convert`, which
rewires a Llama checkpoint without loading it, and the SmolLM2 test checkpoint. `import ladder` registers the model."""
