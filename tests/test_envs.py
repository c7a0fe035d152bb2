"""Library versions as implementations: `hf==5.22.0` runs hf on transformers 5.22.0 in a virtual environment bughunt
creates once in the user cache (BUGHUNT_ENVS moves it; `make envs`, run by `make test`, creates it beforehand) and
reuses. The older release agrees with the installed one at the fp32 floor on every tiny family; a half-built
environment is never used; without the package registry the run is refused with one message."""

import platform

import pytest

from bughunt import envs
from bughunt.cli import main
from bughunt.comparison import compare
from bughunt.errors import BughuntError
from bughunt.implementations import ImplChoice
from bughunt.tiny import TINY_FAMILIES
from bughunt.worker import WorkerPool

OLD = "5.22.0"  # the release `make envs` creates (Makefile: TEST_ENVS)


@pytest.fixture(scope="module")
def old_hf():
    """The interpreter of hf==OLD, created on first use (about a minute on a warm pip cache), reused after."""
    return envs.ensure("hf", OLD)


@pytest.fixture(scope="module")
def pool():
    with WorkerPool() as p:
        yield p


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_an_older_transformers_release_agrees_with_the_installed_one_at_the_fp32_floor(old_hf, pool, tiny, tokens, family):
    label = f"hf=={OLD}"
    result = compare(tiny[family], [label, "hf", "reference"], dtype="fp32", tokens=tokens, render=False, pool=pool)
    entries = {e["label"]: e for e in result.data["implementations"]}
    assert entries[label]["status"] == "ok", entries[label]["error"]
    assert entries[label]["meta"]["versions"]["transformers"] == OLD
    assert entries[label]["meta"]["worker"]["python"] == old_hf
    assert entries["hf"]["meta"]["versions"]["transformers"] != OLD
    assert entries[label]["meta"]["versions"]["torch"] == entries["hf"]["meta"]["versions"]["torch"]  # the same wheel
    for candidate in (label, "hf"):
        assert result.comparison(candidate)["first_above_floor"] is None, (candidate, result.comparison(candidate)["first_above_floor"])


def test_the_environment_is_listed_with_its_pins(old_hf, capsys):
    listed = {e.name: e for e in envs.list_envs()}
    env = next(e for e in listed.values() if str(e.path) in old_hf)
    assert env.complete and env.meta["version"] == OLD and env.meta["packages"]["transformers"] == OLD
    assert main(["envs", "list"]) == 0
    assert env.name in capsys.readouterr().out


def test_choice_syntax():
    c = ImplChoice.parse("hf==5.22.0:bf16[gelu=exact]")
    assert (c.name, c.version, c.dtype, c.label) == ("hf", "5.22.0", "bf16", "hf==5.22.0:bf16[gelu=exact]")
    with pytest.raises(BughuntError, match="both a library release and an interpreter"):
        ImplChoice.parse("hf==5.22.0@/usr/bin/python3")
    with pytest.raises(BughuntError, match="cannot be run at another library release"):
        ImplChoice.parse("reference==1.0")


def _key(version):
    import torch

    return envs.env_name("transformers", version, platform.python_version(), torch.__version__)


def test_half_built_environments_are_never_used_and_can_be_removed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BUGHUNT_ENVS", str(tmp_path))
    (tmp_path / f".{_key('5.21.0')}.build-abc").mkdir()  # a creation that was killed
    (tmp_path / _key("5.20.0")).mkdir()  # a directory without bughunt's completion marker
    (tmp_path / "users-own").mkdir()  # not bughunt's: listed nowhere, never removed
    assert main(["envs", "list"]) == 0
    out = capsys.readouterr().out
    assert "half-built" in out and _key("5.20.0") in out
    with pytest.raises(BughuntError, match="not a complete bughunt environment"):
        envs.ensure("hf", "5.20.0")
    assert "users-own" not in out
    assert main(["envs", "remove", "--all"]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["users-own"]


def test_without_the_package_registry_the_run_is_refused_with_one_message(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setenv("BUGHUNT_ENVS", str(tmp_path / "envs"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no registry: pip may look only in local find-links
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    out = tmp_path / "out"
    code = main(["compare", str(tiny["llama"]), "--impl", "hf==5.21.0", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "transformers==5.21.0" in err and "package registry" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]  # nothing half-built left behind


def test_a_run_asking_for_an_environment_another_is_creating_waits_and_reuses_it(tmp_path, monkeypatch):
    import fcntl
    import threading

    monkeypatch.setenv("BUGHUNT_ENVS", str(tmp_path))
    key = _key("5.19.0")
    got = []
    with open(tmp_path / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run is creating it
        waiter = threading.Thread(target=lambda: got.append(envs.ensure("hf", "5.19.0")))
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive() and not got  # waits on the lock instead of building a second copy
        (tmp_path / key).mkdir()
        (tmp_path / key / envs.MARKER).write_text("{}")  # the other run finished and renamed it into place
    waiter.join(timeout=30)
    assert got == [str(tmp_path / key / "bin" / "python")]
