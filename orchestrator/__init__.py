"""The workstation side of zowarmup: data, model zoo, warm-up, rounds, export, reports."""
