"""Training module: export bundles and COVIDx CT-2 to an evaluated model bundle (see issue 4)."""
