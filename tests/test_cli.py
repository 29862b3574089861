from click.testing import CliRunner

from crepa.cli import main


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"], prog_name="crepa")
    assert result.exit_code == 0, result.output
    assert "Usage: crepa" in result.output
