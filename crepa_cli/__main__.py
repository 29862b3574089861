"""`python -m crepa_cli ...` is `crepa ...`."""

from crepa_cli.main import main

if __name__ == "__main__":
    main(prog_name="crepa")
