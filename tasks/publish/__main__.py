"""`python -m tasks.publish`: what dvc.yaml and the Prefect flow run."""

from tasks.common.runner import run_main
from tasks.publish.stage import main

run_main("publish", main)
