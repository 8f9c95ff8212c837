import pytest


@pytest.fixture(scope="session")
def encoding(vocab_dir):
    """The gpt-oss Harmony encoding, loaded offline from the session vocabulary."""
    from shared.vocab import load_harmony_encoding

    return load_harmony_encoding(vocab_dir)
