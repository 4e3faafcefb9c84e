"""Task types: classification, extractive QA, generation (more by `registry.register`)."""
