"""`python -m tasks.validate`: what dvc.yaml and the Prefect flow run."""

from tasks.common.runner import run_main
from tasks.validate.stage import main

run_main("validate", main)
