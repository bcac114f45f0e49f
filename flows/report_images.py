"""Kept only for the Makefile's `report-images` target: the script is tasks/validate/report_images.py
(`python -m tasks.validate.report_images`). Remove this file once the Makefile runs that name."""

import runpy

runpy.run_module("tasks.validate.report_images", run_name="__main__")
