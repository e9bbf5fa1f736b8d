"""Flows: compose the tasks; each is runnable from the command line."""
