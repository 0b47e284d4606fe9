"""Networks the methods build on: backbones, heads, CLIP wrappers, adapters, fixed classifiers."""
