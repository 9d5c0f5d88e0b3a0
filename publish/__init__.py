"""`ladder-publish`: a gated ladder model leaves as a folder or a Hub repository that any transformers user can load,
with its evidence (provenance, gate reports) and a model card."""
