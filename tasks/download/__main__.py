"""`python -m tasks.download`: what dvc.yaml and the Prefect flow run."""

from tasks.common.runner import run_main
from tasks.download.stage import main

run_main("download", main)
