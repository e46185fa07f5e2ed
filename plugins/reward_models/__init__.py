"""Reward models for the inference mode: one score per (instruction, response), higher is better."""
