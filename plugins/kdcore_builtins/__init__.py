"""kdcore's built-in plugins.

Each module is listed under the ``kdcore`` entry-point group in kdcore's ``pyproject.toml`` and
registers through the same hooks a third-party plugin implements; the core never imports them.
"""
