"""`python -m tasks.format`: what dvc.yaml and the Prefect flow run."""

from tasks.common.runner import run_main
from tasks.format.stage import main

run_main("format", main)
