"""`python -m tasks.train`: what dvc.yaml and the Prefect flow run."""

from tasks.common.runner import run_main
from tasks.train.stage import main

run_main("train", main)
