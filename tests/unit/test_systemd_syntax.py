"""ExecStart= words as systemd reads them: quoting for systemd, not for a shell (the round trip through a
real systemd is in tests/e2e/test_inference.py)."""

import shutil
import subprocess

import pytest

from operations.core import systemd_syntax
from operations.core.errors import ConfigError
from operations.services import engines, inference
from tests.unit.test_inference import SERVICE

HARD = ["100%{x}", "$HOME", "${HOME}", "it's", 'a "b"', "back\\slash", "\\n", ";", "", "two words", "-x=1"]


def test_plain_words_stay_plain_and_the_rest_is_double_quoted_with_escapes():
    assert (
        systemd_syntax.command_line(["/usr/bin/docker", "run", "--name", "gpufleet-chat"])
        == "/usr/bin/docker run --name gpufleet-chat"
    )
    assert systemd_syntax.command_line(HARD) == (
        '"100%%{x}" "$$HOME" "$${HOME}" "it\'s" "a \\"b\\"" "back\\\\slash" "\\\\n" ";" "" "two words" -x=1'
    )


@pytest.mark.parametrize("text", ["a\nb", "tab\there", "nul\x00", "bell\x07"])
def test_control_characters_are_refused(text):
    with pytest.raises(ValueError, match="control characters"):
        systemd_syntax.word(text)


def test_a_newline_in_engine_args_is_refused_before_any_host_changes():
    with pytest.raises(ConfigError, match=r"inference_services\[0\]\.args: .*control characters"):
        engines.check_service(0, {**SERVICE, "args": ["--chat-template", "line1\nline2"]})


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed here")
def test_systemd_analyze_verifies_a_unit_with_every_hard_word(tmp_path):
    unit = tmp_path / "gpufleet-quoting.service"
    unit.write_text(
        "[Unit]\nDescription=quoting\n[Service]\nType=oneshot\n"
        f"ExecStart={systemd_syntax.command_line(['/bin/echo', *HARD])}\n"
    )
    checked = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    rendered = inference.unit_text(
        {**SERVICE, "args": ["--chat-template", "{{ x }} 100% $y \\ 'q'"]}, "/srv/w", None, False, 300
    )
    docker_run = next(line for line in rendered.splitlines() if line.startswith("ExecStartPre=/usr/bin/docker run"))
    assert "\"{{ x }} 100%% $$y \\\\ 'q'\"" in docker_run


def test_a_service_without_args_passes():
    engines.check_service(0, {key: value for key, value in SERVICE.items() if key != "args"})
