"""Built-in plugins of profuser, installed as the import package ``profuser_plugins``.

Each submodule (or subpackage) is one plugin implementing registration hooks, exactly as a
third-party package would. They are found by listing this package, so adding a plugin is
adding a module here.
"""

import pkgutil

BUILTIN_PLUGINS = sorted(f"{__name__}.{module.name}" for module in pkgutil.iter_modules(__path__))
