"""`python -m precompute ...` is `crepa precompute ...`."""

from crepa_cli.precompute import precompute_command

if __name__ == "__main__":
    precompute_command(prog_name="python -m precompute")
