"""Experiments made of several fine-tuning runs: CoFiTune's coarse search, continual stages,
method comparison (each run is launch/finetune.py in a subprocess)."""
