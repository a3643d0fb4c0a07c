"""Shared fixtures live in tests/helpers/*; register them here."""

pytest_plugins = [
    "tests.helpers.s3",
    "tests.helpers.otlp",
    "tests.helpers.mesh",
    "tests.helpers.browser",
    "tests.helpers.workers",
]
