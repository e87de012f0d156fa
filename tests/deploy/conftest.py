import pytest


@pytest.fixture
def generator(artifact):
    """The session's artifact in a CPU Generator."""
    from deploy import Generator

    return Generator(artifact.out, providers="cpu")
