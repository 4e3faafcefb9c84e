"""Task types: classification, extractive QA, generation (more by `registry.register`).

The package's face: importing any part of it (the registry included) first imports the built-in
types below, and each registers itself; the registry itself imports none of them. Code outside
the package imports the names below from `trainer.tasks` (see trainer/face.py).
"""

from trainer.face import face
from trainer.tasks import classification, extractive_qa, generation  # noqa: F401  (they register themselves)

__getattr__, __dir__, __all__ = face(__name__, {
    "registry": ("TaskContext", "TaskType"),
    "classification": ("label_text",),
    "text2text": ("CHARS_PER_TOKEN_BOUND",),
}, modules=("registry", "text2text"))
