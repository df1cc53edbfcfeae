"""Optuna sweeps of forde trainings that survive killed workers, storage outages and relaunches, on one machine or
many (`python sweeps/launch.py --study NAME`)."""
