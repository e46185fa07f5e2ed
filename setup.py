"""The folder plugins/ is installed as the import package `profuser_plugins`.

The folder name shows the architecture; the import name avoids claiming a generic top-level
`plugins` module in users' environments. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

core = find_packages(include=["profuser", "profuser.*"])
plugins = ["profuser_plugins" + name[len("plugins"):] for name in find_packages(include=["plugins", "plugins.*"])]

setup(
    packages=core + plugins,
    package_dir={"profuser_plugins": "plugins"},
    package_data={"profuser": ["py.typed", "data/*.json"], "profuser_plugins": ["**/*.yaml", "**/*.json"]},
)
