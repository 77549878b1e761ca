"""Trainers: `local` (in-process, CPU or one GPU) and `verl` (VERL on Ray)."""
