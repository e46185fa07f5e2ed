"""Built-in plugins of profuser, installed as the import package ``profuser_plugins``.

Every module below this package (``evaluators/min_ce.py``, ``losses/fuse_kl.py``, ...) is one
plugin implementing registration hooks, exactly as a third-party package would. They are found by
walking the package, so adding a built-in plugin is adding a module; subpackages only group them.
"""

import pkgutil

BUILTIN_PLUGINS = sorted(
    module.name
    for module in pkgutil.walk_packages(__path__, prefix=f"{__name__}.")
    if not module.ispkg and not module.name.rsplit(".", 1)[-1].startswith("_")
)
