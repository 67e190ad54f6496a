"""``python -m fastcert.certify``."""
from fastcert.certify.command import cli

if __name__ == "__main__":
    cli()
