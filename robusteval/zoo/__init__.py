"""Bundled checkpoints (`zoo:NAME`) and the bundled Fashion-MNIST test subset; see README.md here."""
