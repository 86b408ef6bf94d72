"""`serve --host` beyond loopback without an API key refuses to start (exit 2, one clear line) unless
`--insecure-no-key` is given; loopback needs no key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loraforge.errors import ConfigError
from loraforge.serve.app import check_exposure


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST.", "::1", "[::1]"])
def test_loopback_needs_no_key(host: str) -> None:
    check_exposure(host, None, False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.5", "my-host.example", "10.0.0.1"])
def test_other_hosts_need_a_key_or_the_insecure_flag(host: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="--api-key.*--insecure-no-key"):
        check_exposure(host, None, False)
    with pytest.raises(ConfigError):
        check_exposure(host, "", False)  # an empty key is no key
    check_exposure(host, "secret", False)
    assert capsys.readouterr().err == ""
    check_exposure(host, None, True)
    assert "without an API key" in capsys.readouterr().err


def test_the_cli_refuses_before_loading_anything(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LORAFORGE_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "loraforge.cli", "serve", str(tmp_path / "no-such-run"),
                          "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert "--insecure-no-key" in out.stderr and "Traceback" not in out.stderr
