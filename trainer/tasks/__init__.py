"""Task types: classification, extractive QA, generation (more by `registry.register`).

The package's face: importing any part of it (the registry included) first imports the built-in
types below, and each registers itself; the registry itself imports none of them.
"""

from trainer.tasks import classification, extractive_qa, generation  # noqa: F401  (they register themselves)
