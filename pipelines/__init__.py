"""End-to-end recipes that chain `dfd-data` and `dfd-model` steps into one resumable run."""
