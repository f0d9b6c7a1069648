"""`python -m pipelines` is the same as `dfd-pipeline`."""
from .cli import main

main()
