"""The pipeline's stages, one package each, and what they share (common)."""
