"""`python -m train ...` is `crepa train ...`."""

from crepa_cli.train import train_command

if __name__ == "__main__":
    train_command(prog_name="python -m train")
