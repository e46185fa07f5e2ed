"""Tokenizer aligners: which source tokens correspond to each target token of the same text.

``offsets`` (default): linear time from the character offsets of both tokenisations, refined to
bytes where a tokenizer splits one character into several tokens. ``dtw``: FuseLLM's dynamic time
warping over token edit distance, O(n·m), kept as the paper's baseline. See docs/alignment.md.
"""
