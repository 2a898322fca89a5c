import io
import sys

import pytest

from dkm_param.progress import track


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_disabled_returns_the_iterable_itself(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    items = [1, 2, 3]
    assert track(items, enabled=False) is items


def test_not_a_terminal_returns_the_iterable_itself(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    items = range(5)
    assert track(items, total=5, desc="work") is items


def test_no_stderr_at_all_returns_the_iterable_itself(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)
    items = (1, 2)
    assert track(items) is items


@pytest.mark.parametrize("stream, enabled", [(Terminal(), None), (io.StringIO(), True)])
def test_bar_yields_the_same_items(monkeypatch, stream, enabled):
    tqdm = pytest.importorskip("tqdm")
    monkeypatch.setattr(sys, "stderr", stream)
    wrapped = track(iter(range(4)), total=4, desc="epochs", enabled=enabled, delay=0)
    assert isinstance(wrapped, tqdm.tqdm)
    assert list(wrapped) == [0, 1, 2, 3]
    assert "epochs" in stream.getvalue()


def test_without_tqdm_returns_the_iterable_itself(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    items = [1, 2]
    assert track(items, enabled=True) is items


def test_tqdm_disable_silences_even_a_forced_bar():
    # tqdm reads TQDM_* variables when it is imported: set it for a fresh process
    import os
    import subprocess
    import sys

    pytest.importorskip("tqdm")
    code = (
        "from dkm_param.progress import track;"
        "print(list(track(range(3), total=3, desc='layers', enabled=True, delay=0)))"
    )
    env = dict(os.environ, TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[0, 1, 2]" and "layers" not in done.stderr


def test_the_install_hint_names_a_package_pip_can_find():
    assert "pip install 'tqdm>=4.60'" in track.__doc__ and '".[progress]"' in track.__doc__
    assert "dkm-param[" not in track.__doc__  # dkm-param itself is not on PyPI
