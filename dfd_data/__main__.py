"""`python -m dfd_data` is the same as `dfd-data`."""
from .cli import main

main()
