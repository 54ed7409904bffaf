"""gasp-vlm: Geometric-Aware Spatial Priors for vision-language models.

Layout (data flows one way, top to bottom):
  geometry/  cameras, projection, GT correspondences (numpy, no models)
  data/      scene format, synthetic renderer, converters, per-token targets, datasets
  models/    per-family VLM adapters, token layout, per-layer capture
  method/    correspondence heads + GASP losses + the training wrapper
  train/     the training recipe and export
  diagnose/  layer-wise internal correspondence diagnostics
  bench/     spatial benchmarks: load -> prompt -> score
  cli.py     the `gasp` command (thin)
"""

__version__ = "0.1.0"
