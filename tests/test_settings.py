"""Settings: every variable parsed in one place, overrides nest, and stay within their thread."""
import threading

import pytest

from torchtune_ops import settings
from torchtune_ops.errors import SettingsError


def test_defaults_without_environment():
    s = settings.from_environ({})
    assert s.autotune == "off" and not s.tuning
    assert s.max_trials == 40 and s.readonly is False and s.bundles == ()


@pytest.mark.parametrize("raw, expected", [("1", "on"), ("true", "on"), ("0", "off"), ("", "off"),
                                           ("background", "background"), ("ON", "on")])
def test_autotune_values(raw, expected):
    assert settings.from_environ({"TORCHTUNE_OPS_AUTOTUNE": raw}).autotune == expected


@pytest.mark.parametrize("var, raw", [("TORCHTUNE_OPS_AUTOTUNE", "maybe"), ("TORCHTUNE_OPS_MAX_TRIALS", "0"),
                                      ("TORCHTUNE_OPS_MAX_TRIALS", "ten"), ("TORCHTUNE_OPS_TIME_BUDGET", "-1"),
                                      ("TORCHTUNE_OPS_LOG", "LOUD"), ("TORCHTUNE_OPS_BUCKET", "pow3")])
def test_bad_values_name_the_variable(var, raw):
    with pytest.raises(SettingsError, match=var):
        settings.from_environ({var: raw})


def test_paths_split_on_pathsep(tmp_path):
    import os

    raw = os.pathsep.join(["a.json", "", "b.json"])
    assert settings.from_environ({"TORCHTUNE_OPS_BUNDLES": raw}).bundles == ("a.json", "b.json")


def test_readonly_disables_tuning():
    s = settings.from_environ({"TORCHTUNE_OPS_AUTOTUNE": "1", "TORCHTUNE_OPS_READONLY": "1"})
    assert s.autotune == "on" and not s.tuning


def test_override_nests_and_restores(monkeypatch):
    monkeypatch.setenv("TORCHTUNE_OPS_MAX_TRIALS", "7")
    settings.reload()
    assert settings.current().max_trials == 7
    with settings.override(autotune=True, max_trials=3):
        assert settings.current().autotune == "on" and settings.current().max_trials == 3
        with settings.override(max_trials=None, time_budget=2.5):  # None keeps the outer value
            assert settings.current().max_trials == 3 and settings.current().time_budget == 2.5
        assert settings.current().time_budget == 30.0
    assert settings.current().autotune == "off" and settings.current().max_trials == 7


def test_override_rejects_unknown_and_bad_values():
    with pytest.raises(SettingsError, match="unknown setting"):
        with settings.override(no_such_thing=1):
            pass
    with pytest.raises(SettingsError):
        with settings.override(autotune="sometimes"):
            pass
    assert settings.current().autotune == "off"


def test_overrides_stay_in_their_thread():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def other():
        inside.wait(5)
        seen["other"] = settings.current().autotune
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with settings.override(autotune=True):
        inside.set()
        release.wait(5)
        seen["main"] = settings.current().autotune
    t.join(5)
    assert seen == {"main": "on", "other": "off"}


def test_reload_sees_environment_changes_inside_override(monkeypatch):
    with settings.override(autotune=True):
        monkeypatch.setenv("TORCHTUNE_OPS_MAX_TRIALS", "11")
        settings.reload()
        assert settings.current().max_trials == 11 and settings.current().autotune == "on"


def test_describe_lists_every_variable():
    text = settings.describe()
    for d in settings.DECLARED:
        assert d.env in text
