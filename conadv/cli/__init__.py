"""Thin command-line entry points: argument parsing and nothing else."""
