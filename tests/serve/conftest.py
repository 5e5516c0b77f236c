import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M's tokenizer (49152 ids, a chat template), from the converted model in ~/.cache/llmasos."""
    transformers = pytest.importorskip("transformers")
    from llmasos.zoo import cache_dir, load_smollm2
    d = cache_dir() / "smollm2-135m-instruct"
    if not (d / "tokenizer_config.json").exists():
        load_smollm2(verbose=False)          # converts the shipped GGUF once
    return transformers.AutoTokenizer.from_pretrained(d)
