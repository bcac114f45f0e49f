"""Prefect flows: they only orchestrate the stages in tasks/."""
