"""``python -m fastcert.certify``."""
from fastcert.certify.command import cli

cli()
