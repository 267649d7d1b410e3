"""Registers the project's pytest plugins for tests/ and bench/ alike: the hooks and the
leftover check (tests/plugin.py), the region and CPU fixtures (tests/fixtures.py) and the fake
sysfs trees (tests/sysfs.py)."""
pytest_plugins = ["tests.plugin", "tests.fixtures", "tests.sysfs"]
