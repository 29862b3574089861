from click.testing import CliRunner

from crepa_cli.main import main


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"], prog_name="crepa")
    assert result.exit_code == 0, result.output
    assert "Usage: crepa" in result.output
    for command in ("precompute", "train", "cache", "demo"):
        assert command in result.output


def test_bad_input_is_one_clear_message(tmp_path):
    result = CliRunner().invoke(main, ["cache", "info", str(tmp_path / "nowhere")], prog_name="crepa")
    assert result.exit_code != 0
    assert "no cache at" in result.output and "Traceback" not in result.output
