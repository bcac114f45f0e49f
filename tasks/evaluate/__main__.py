"""`python -m tasks.evaluate`: what dvc.yaml and the Prefect flow run."""

from tasks.common.runner import run_main
from tasks.evaluate.stage import main

run_main("evaluate", main)
