"""Built-in curricula: how the examples of the two modes are ordered into training phases.

``progressive`` (ProFuser, App. A), ``reverse`` (ReverseFuse), ``simultaneous`` (SimulFuse),
``training_only`` (FuseLLM-style Fuse), ``sft_only`` (continual SFT) and the §5.2 data-centric
variants ``length_split`` and ``rm_split``. docs/training.md lists the exact phases of each.
"""
