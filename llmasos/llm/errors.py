"""The LLM runtime's request error (its own module: runtime.py and paged.py both raise it)."""


class GenerationError(ValueError):
    """A generation request the compiled model cannot serve (empty prompt, too long, bad token ids...)."""
