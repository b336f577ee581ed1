"""Distributed execution: process groups from the torchrun/SLURM environment, backends, checkpoints."""
