"""`python -m dfd_model` runs the dfd-model command line (also under torchrun)."""
from .cli import main

main()
