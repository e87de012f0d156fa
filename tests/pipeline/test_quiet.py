import os

from pipeline.quiet import stderr_silenced


def test_stderr_silenced_drops_fd2_writes_and_restores(capfd):
    with stderr_silenced():
        os.write(2, b"banner from C++\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
