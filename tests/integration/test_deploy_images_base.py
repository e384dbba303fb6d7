"""deploy/images/build.py's reading of this machine, offline: what of pip's
settings goes into the bookworm base (files copied, this machine's disk left
out, the bundle), where the Debian mirror comes from, and that the base's key
follows its recipe. The base itself is built and used by
tests/integration/test_deploy_images.py."""

from __future__ import annotations

import configparser
import os

import pytest

from tests.integration.image_support import build_module


@pytest.fixture
def build(monkeypatch, tmp_path):
    module = build_module()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    return module


def _settings(build, monkeypatch, config):
    monkeypatch.setattr(build, "machine_pip_config", lambda: config)
    return build.base_pip_settings()


def test_pip_settings_copy_files_and_leave_this_machines_disk_out(build, monkeypatch, tmp_path):
    bundle = tmp_path / "corp-ca.pem"
    bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    text, files, notes = _settings(build, monkeypatch, {
        "global": {"cert": str(bundle), "index-url": "https://mirror.invalid/simple",
                   "extra-index-url": f"file://{tmp_path}/pypi/simple https://other.invalid/simple",
                   "find-links": str(wheels), "constraint": str(constraints), "timeout": "60",
                   "cache-dir": "/root/.cache/pip"},
        "install": {"trusted-host": "mirror.invalid"},
    })
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(text)
    assert conf["global"]["index-url"] == "https://mirror.invalid/simple"
    assert conf["global"]["extra-index-url"] == "https://other.invalid/simple"
    assert conf["global"]["constraint"] == str(constraints)
    assert conf["global"]["timeout"] == "60"
    assert conf["global"]["cert"] == build.BASE_BUNDLE
    assert conf["install"]["trusted-host"] == "mirror.invalid"
    assert "find-links" not in conf["global"] and "cache-dir" not in conf["global"]
    assert files == {str(constraints): b"torch<=2\n", build.BASE_BUNDLE: bundle.read_bytes()}
    assert any("find-links" in n for n in notes) and any("pypi/simple" in n for n in notes)


def test_the_bundle_falls_back_to_what_the_environment_names(build, monkeypatch, tmp_path):
    bundle = tmp_path / "env-ca.pem"
    bundle.write_bytes(b"pem")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    _, files, _ = _settings(build, monkeypatch, {})
    assert files[build.BASE_BUNDLE] == b"pem"


def test_environment_settings_win_in_every_section(build, monkeypatch):
    listed = "global.timeout='10'\ninstall.timeout='20'\n:env:.timeout='30'\nglobal.retries='2'\n"

    class Done:
        returncode = 0
        stdout = listed

    monkeypatch.setattr(build, "_run", lambda *a, **k: Done())
    assert build.machine_pip_config() == {"global": {"timeout": "30", "retries": "2"}, "install": {}}


def test_apt_sources_give_the_bookworm_mirror_and_keyring(build, tmp_path):
    keyring = tmp_path / "k.gpg"
    keyring.write_bytes(b"k")
    deb822 = (f"Types: deb\nURIs: http://a.invalid/debian\nSuites: bookworm bookworm-updates\n"
              f"Components: main\nSigned-By: {keyring}\n\nTypes: deb-src\nURIs: http://b.invalid\n"
              f"Suites: bookworm\n")
    assert list(build._deb822_entries(deb822)) == [("http://a.invalid/debian", ["bookworm", "bookworm-updates"],
                                                    str(keyring))]
    one_line = (f"# deb http://x.invalid bookworm main\ndeb [arch=amd64 signed-by={keyring}] "
                f"http://c.invalid/debian bookworm main\ndeb http://d.invalid trixie main\n")
    assert list(build._one_line_entries(one_line)) == [("http://c.invalid/debian", ["bookworm"], str(keyring)),
                                                      ("http://d.invalid", ["trixie"], None)]


def test_the_base_key_follows_its_recipe(build, monkeypatch):
    monkeypatch.setattr(build, "debian_mirror", lambda: ("http://a.invalid/debian", None))
    monkeypatch.setattr(build, "machine_pip_config", lambda: {"global": {"timeout": "10"}})
    first, _ = build.base_recipe()
    assert build.base_recipe()[0] == first
    monkeypatch.setattr(build, "machine_pip_config", lambda: {"global": {"timeout": "11"}})
    assert build.base_recipe()[0] != first
    monkeypatch.setattr(build, "machine_pip_config", lambda: {"global": {"timeout": "10"}})
    monkeypatch.setattr(build, "debian_mirror", lambda: ("http://other.invalid/debian", None))
    assert build.base_recipe()[0] != first


def test_without_pip_the_files_and_environment_are_read_by_hand(build, monkeypatch, tmp_path):
    (tmp_path / "xdg" / "pip").mkdir(parents=True)
    (tmp_path / "xdg" / "pip" / "pip.conf").write_text("[global]\nindex-url = https://a.invalid/simple\n"
                                                       "timeout = 5\n[install]\ntimeout = 7\n")
    (tmp_path / "home" / ".config" / "pip").mkdir(parents=True)
    (tmp_path / "home" / ".config" / "pip" / "pip.conf").write_text("[global]\nindex-url = https://b.invalid/s\n")
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("PIP_CONFIG_FILE", raising=False)
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "9")
    monkeypatch.setattr(build, "_listed_by_pip", lambda: None)
    got = build.machine_pip_config()
    # (/etc/pip.conf, when there is one, is read too.)
    assert {k: got["global"][k] for k in ("index-url", "timeout", "default-timeout")} == {
        "index-url": "https://b.invalid/s", "timeout": "5", "default-timeout": "9"}
    assert got["install"] == {"timeout": "7"}
