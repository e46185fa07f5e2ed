"""profuser: fuse heterogeneous LLMs into one (ProFuser and friends), driven by plugins and recipes."""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # plugins write `from profuser import hookimpl`

__all__ = ["__version__", "hookimpl"]
